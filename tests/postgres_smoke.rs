//! Postgres driver checks that the shared conformance suite does not cover: migrations run twice
//! (and concurrently), several nodes appending to one room, and group commit with a refusal inside.

mod common;

use std::collections::HashSet;

use cochat::store::postgres::PostgresStore;
use cochat_actors::error::ErrorCode;
use cochat_actors::event::{Author, AuthorKind, EventBody, UserRef};
use cochat_actors::ids::{MessageId, RoomId};
use cochat_actors::ports::{Command, RoomLog, Store, Write};
use common::db::TestDatabase;

fn post(room: &RoomId, author: &Author, client_msg_id: &str) -> Write {
    Write {
        room: room.clone(),
        command: Command::PostMessage {
            author: author.clone(),
            client_msg_id: client_msg_id.to_owned(),
            text: format!("hello {client_msg_id}"),
            reply_to: None,
        },
    }
}

async fn setup(store: &PostgresStore) -> (RoomId, Author) {
    let user = store
        .create_user("Alice", "Alice A.", "hash")
        .await
        .expect("user is created");
    let owner = UserRef {
        id: user.id.clone(),
        name: user.display_name.clone(),
    };
    let (room, _) = store
        .create_room("general", &owner)
        .await
        .expect("room is created");
    let author = Author {
        id: user.id,
        name: user.display_name,
        kind: AuthorKind::User,
    };
    (room.id, author)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_safe_to_race() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    // Several replicas starting together.
    let (a, b, c) = tokio::join!(
        PostgresStore::connect(&db.url),
        PostgresStore::connect(&db.url),
        PostgresStore::connect(&db.url),
    );
    let (a, _b, _c) = (
        a.expect("first connect"),
        b.expect("second connect"),
        c.expect("third connect"),
    );
    // And once more later.
    let d = PostgresStore::connect(&format!("{}?pool_size=2", db.url))
        .await
        .expect("reconnect with a pool size");
    a.ping().await.expect("ping");
    d.ping().await.expect("ping");
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("direct connection");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT count(*), count(DISTINCT version), min(version), max(version) FROM schema_migrations", &[])
        .await
        .expect("migrations table");
    let (rows, distinct) = (row.get::<_, i64>(0), row.get::<_, i64>(1));
    assert_eq!(rows, distinct, "each migration is recorded exactly once");
    assert_eq!(
        (row.get::<_, i32>(2), row.get::<_, i32>(3) as i64),
        (1, rows),
        "V001..V{rows}, none missing"
    );
    assert!(rows >= 2, "V001 and V002 at least");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_append_to_one_room_without_gaps() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let node_a = std::sync::Arc::new(PostgresStore::connect(&db.url).await.expect("node a"));
    let node_b = std::sync::Arc::new(PostgresStore::connect(&db.url).await.expect("node b"));
    let (room, author) = setup(&node_a).await;

    const TASKS: usize = 8;
    const BATCHES: usize = 10;
    const PER_BATCH: usize = 25;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = if task % 2 == 0 {
            node_a.clone()
        } else {
            node_b.clone()
        };
        let (room, author) = (room.clone(), author.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for batch in 0..BATCHES {
                let writes = (0..PER_BATCH)
                    .map(|i| post(&room, &author, &format!("t{task}-b{batch}-{i}")))
                    .collect();
                for result in store.append(writes).await.expect("append") {
                    let applied = result.expect("every post is applied");
                    assert!(!applied.duplicate);
                    seqs.push(applied.seq);
                }
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task ran"));
    }
    let total = TASKS * BATCHES * PER_BATCH;
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(unique.len(), total, "no seq acknowledged twice");

    let events = node_b
        .events_after(&room, 0, (total + 10) as u32)
        .await
        .expect("events");
    let seqs: Vec<i64> = events.iter().map(|event| event.seq).collect();
    let expected: Vec<i64> = (1..=(total as i64 + 1)).collect();
    assert_eq!(
        seqs, expected,
        "the log is gap-free (seq 1 is the owner joining)"
    );
    let state = node_b
        .room_state(&room)
        .await
        .expect("state")
        .expect("room exists");
    assert_eq!(state.head_seq, total as i64 + 1);

    // A repeat from the other node answers with the first ack.
    let again = node_b
        .append(vec![post(&room, &author, "t0-b0-0")])
        .await
        .expect("append")
        .remove(0)
        .expect("a repeat is not an error");
    assert!(again.duplicate && again.event.is_none());
    assert!(unique.contains(&again.seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_in_a_batch_changes_nothing_and_the_rest_commits() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let store = PostgresStore::connect(&db.url).await.expect("connect");
    let (room, author) = setup(&store).await;
    let missing_room = RoomId::random();

    let results = store
        .append(vec![
            post(&room, &author, "one"),
            Write {
                room: room.clone(),
                command: Command::EditMessage {
                    actor: author.id.clone(),
                    message_id: MessageId::random(),
                    text: "nope".into(),
                },
            },
            post(&room, &author, "two"),
            post(&missing_room, &author, "three"),
            post(&room, &author, "one"),
            Write {
                room: room.clone(),
                command: Command::PostMessage {
                    author: author.clone(),
                    client_msg_id: "four".into(),
                    text: "reply".into(),
                    reply_to: Some(MessageId::random()),
                },
            },
        ])
        .await
        .expect("the batch commits");
    assert_eq!(results.len(), 6);
    let first = results[0].clone().expect("first post");
    assert_eq!(first.seq, 2);
    assert_eq!(
        results[1].clone().expect_err("edit refused").code,
        ErrorCode::MessageNotFound
    );
    let second = results[2].clone().expect("second post");
    assert_eq!(second.seq, 3, "the refusal took no seq");
    assert_eq!(
        results[3].clone().expect_err("no room").code,
        ErrorCode::RoomNotFound
    );
    let repeat = results[4].clone().expect("repeat in the same batch");
    assert!(repeat.duplicate);
    assert_eq!(
        (repeat.seq, repeat.message_id),
        (2, first.message_id.clone())
    );
    assert_eq!(
        results[5].clone().expect_err("bad reply").code,
        ErrorCode::MessageNotFound
    );

    // Edits and deletes of a message posted earlier in the same batch see it.
    let message_id = first.message_id.expect("post has an id");
    let results = store
        .append(vec![
            post(&room, &author, "five"),
            Write {
                room: room.clone(),
                command: Command::EditMessage {
                    actor: author.id.clone(),
                    message_id: message_id.clone(),
                    text: "edited".into(),
                },
            },
            Write {
                room: room.clone(),
                command: Command::DeleteMessage {
                    actor: author.id.clone(),
                    actor_is_admin: false,
                    message_id: message_id.clone(),
                },
            },
        ])
        .await
        .expect("the batch commits");
    let seqs: Vec<i64> = results
        .into_iter()
        .map(|result| result.expect("applied").seq)
        .collect();
    assert_eq!(seqs, vec![4, 5, 6]);
    let events = store.events_after(&room, 0, 100).await.expect("events");
    assert_eq!(events.len(), 6);
    for event in &events {
        match &event.event {
            EventBody::MessageCreated { message } if message.id == message_id => {
                assert!(message.text.is_empty() && message.deleted, "redacted")
            }
            EventBody::MessageEdited { text, .. } => assert!(text.is_empty(), "redacted"),
            _ => {}
        }
    }
    let page = store
        .messages(&room, None, None, 10)
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 3);
    assert!(page.messages[0].deleted && page.messages[0].text.is_empty());
    assert!(!page.has_more);
}

/// Rough throughput of group commit: `cargo test --release --test postgres_smoke -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
#[ignore = "a measurement, not a check"]
async fn append_throughput() {
    let Some(db) = TestDatabase::postgres().await else {
        return;
    };
    let store = std::sync::Arc::new(PostgresStore::connect(&db.url).await.expect("connect"));
    const ROOMS: usize = 16;
    const BATCHES: usize = 20;
    const PER_BATCH: usize = 512;
    let mut rooms = Vec::new();
    for i in 0..ROOMS {
        let user = store
            .create_user(&format!("u{i}"), "U", "hash")
            .await
            .expect("user");
        let owner = UserRef {
            id: user.id.clone(),
            name: "U".into(),
        };
        let (room, _) = store.create_room("r", &owner).await.expect("room");
        rooms.push((
            room.id,
            Author {
                id: user.id,
                name: "U".into(),
                kind: AuthorKind::User,
            },
        ));
    }
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for (room, author) in rooms {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..BATCHES {
                let writes = (0..PER_BATCH)
                    .map(|i| post(&room, &author, &format!("b{batch}-{i}")))
                    .collect();
                let results = store.append(writes).await.expect("append");
                assert!(results.iter().all(|result| result.is_ok()));
            }
        }));
    }
    for task in tasks {
        task.await.expect("task ran");
    }
    let elapsed = started.elapsed();
    let total = ROOMS * BATCHES * PER_BATCH;
    eprintln!(
        "{total} posts in {elapsed:?}: {:.0} acked sends/s",
        total as f64 / elapsed.as_secs_f64()
    );
}
