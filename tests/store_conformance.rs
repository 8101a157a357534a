//! The store conformance suite: one set of behaviours, written once against `Arc<dyn Store>`, run
//! against SQLite (always) and Postgres (when a server is reachable; see `common::db`). Each test
//! gets its own database, so tests run in parallel without seeing each other.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cochat_actors::error::{ErrorCode, StoreError};
use cochat_actors::event::{Author, AuthorKind, EventBody, LeaveReason, StoredEvent, UserRef};
use cochat_actors::ids::{MessageId, Role, RoomId, Seq};
use cochat_actors::ports::{Applied, Command, NewInvite, Store, Write, WriteResult};
use cochat_actors::time::Timestamp;

use common::db::TestDatabase;

// ---------------------------------------------------------------------------------------------
// Helpers

async fn user(store: &Arc<dyn Store>, name: &str) -> UserRef {
    let user = store
        .create_user(name, &format!("{name} display"), "hash")
        .await
        .expect("a fresh username is free");
    UserRef {
        id: user.id,
        name: user.display_name,
    }
}

fn author(user: &UserRef) -> Author {
    Author {
        id: user.id.clone(),
        name: user.name.clone(),
        kind: AuthorKind::User,
    }
}

async fn room(store: &Arc<dyn Store>, owner: &UserRef) -> RoomId {
    store
        .create_room("a room", owner)
        .await
        .expect("room is created")
        .0
        .id
}

async fn one(store: &Arc<dyn Store>, room: &RoomId, command: Command) -> WriteResult {
    let mut results = store
        .append(vec![Write {
            room: room.clone(),
            command,
        }])
        .await
        .expect("the backend is up");
    assert_eq!(results.len(), 1, "one result per write");
    results.remove(0)
}

async fn ok(store: &Arc<dyn Store>, room: &RoomId, command: Command) -> Applied {
    let what = format!("{command:?}");
    one(store, room, command)
        .await
        .unwrap_or_else(|error| panic!("{what} should apply, got {error}"))
}

fn refused(result: WriteResult) -> ErrorCode {
    result.expect_err("the write is refused").code
}

fn store_code<T: std::fmt::Debug>(result: Result<T, StoreError>) -> ErrorCode {
    match result.expect_err("the call is refused") {
        StoreError::Domain(error) => error.code,
        other => panic!("expected a domain error, got {other}"),
    }
}

fn post_cmd(user: &UserRef, client_msg_id: &str, text: &str) -> Command {
    Command::PostMessage {
        author: author(user),
        client_msg_id: client_msg_id.to_owned(),
        text: text.to_owned(),
        reply_to: None,
    }
}

/// Posts and returns (message id, seq).
async fn post(
    store: &Arc<dyn Store>,
    room: &RoomId,
    user: &UserRef,
    text: &str,
) -> (MessageId, Seq) {
    let applied = ok(
        store,
        room,
        post_cmd(user, &format!("c-{}", uuid::Uuid::new_v4()), text),
    )
    .await;
    assert!(!applied.duplicate);
    (
        applied.message_id.expect("a post returns its message id"),
        applied.seq,
    )
}

async fn invite(
    store: &Arc<dyn Store>,
    room: &RoomId,
    by: &UserRef,
    role: Role,
    max_uses: Option<i64>,
    expires_at: Option<Timestamp>,
) -> String {
    let code = format!("inv-{}", uuid::Uuid::new_v4().simple());
    store
        .create_invite(&NewInvite {
            code: code.clone(),
            room: room.clone(),
            role,
            max_uses,
            expires_at,
            created_by: by.id.clone(),
        })
        .await
        .expect("invite is created");
    code
}

/// Adds `user` with `role` through a single-use invite.
async fn join(store: &Arc<dyn Store>, room: &RoomId, owner: &UserRef, user: &UserRef, role: Role) {
    let code = invite(store, room, owner, role, Some(1), None).await;
    let applied = ok(
        store,
        room,
        Command::JoinByInvite {
            user: user.clone(),
            code,
        },
    )
    .await;
    assert_eq!(applied.role, Some(role));
}

async fn events(store: &Arc<dyn Store>, room: &RoomId) -> Vec<StoredEvent> {
    store
        .events_after(room, 0, 1000)
        .await
        .expect("events are readable")
}

async fn head(store: &Arc<dyn Store>, room: &RoomId) -> Seq {
    store
        .room_state(room)
        .await
        .expect("state")
        .expect("room exists")
        .head_seq
}

fn seqs(events: &[StoredEvent]) -> Vec<Seq> {
    events.iter().map(|event| event.seq).collect()
}

/// Timestamps are milliseconds: wait so that "earlier" is observable in ordering.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(3)).await;
}

// ---------------------------------------------------------------------------------------------
// The behaviours

async fn seq_is_gap_free_and_per_room(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let a = room(&store, &alice).await;
    let b = room(&store, &alice).await;
    assert_eq!(
        head(&store, &a).await,
        1,
        "create_room appends member.joined as seq 1"
    );
    let (_, s) = post(&store, &a, &alice, "a1").await;
    assert_eq!(s, 2);
    let (_, s) = post(&store, &b, &alice, "b1").await;
    assert_eq!(s, 2, "each room has its own sequence");
    post(&store, &a, &alice, "a2").await;
    let (_, s) = post(&store, &a, &alice, "a3").await;
    assert_eq!(s, 4);

    let log = events(&store, &a).await;
    assert_eq!(seqs(&log), vec![1, 2, 3, 4]);
    assert!(log.iter().all(|event| event.room == a));
    assert!(
        matches!(&log[0].event, EventBody::MemberJoined { user, role: Role::Owner } if user.id == alice.id)
    );
    let EventBody::MessageCreated { message } = &log[1].event else {
        panic!("seq 2 is the post")
    };
    assert_eq!((message.text.as_str(), message.seq), ("a1", 2));
    assert_eq!(
        seqs(&store.events_after(&a, 2, 1).await.expect("events")),
        vec![3]
    );
    assert!(store
        .events_after(&a, 4, 10)
        .await
        .expect("events")
        .is_empty());
    assert_eq!(seqs(&events(&store, &b).await), vec![1, 2]);
    assert_eq!(head(&store, &a).await, 4);
    assert_eq!(
        store
            .room(&a)
            .await
            .expect("room")
            .expect("exists")
            .last_seq,
        4
    );

    let nowhere = RoomId::random();
    assert_eq!(
        refused(one(&store, &nowhere, post_cmd(&alice, "x", "x")).await),
        ErrorCode::RoomNotFound
    );
    assert!(store.room_state(&nowhere).await.expect("state").is_none());
    assert!(store.room(&nowhere).await.expect("room").is_none());
    assert!(store
        .events_after(&nowhere, 0, 10)
        .await
        .expect("events")
        .is_empty());
}

async fn post_is_idempotent_on_client_msg_id(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let r = room(&store, &alice).await;
    let first = ok(&store, &r, post_cmd(&alice, "same", "hello")).await;
    assert!(first.event.is_some() && !first.duplicate);
    let again = ok(&store, &r, post_cmd(&alice, "same", "hello again")).await;
    assert!(again.duplicate && again.event.is_none());
    assert_eq!(
        (again.seq, &again.message_id),
        (first.seq, &first.message_id)
    );

    // A repeat inside one batch is recognised too.
    let results = store
        .append(vec![
            Write {
                room: r.clone(),
                command: post_cmd(&alice, "batch", "x"),
            },
            Write {
                room: r.clone(),
                command: post_cmd(&alice, "batch", "x"),
            },
        ])
        .await
        .expect("backend up");
    let (x, y) = (
        results[0].clone().expect("first applies"),
        results[1].clone().expect("repeat acks"),
    );
    assert!(!x.duplicate && y.duplicate);
    assert_eq!((x.seq, &x.message_id), (y.seq, &y.message_id));

    // The key includes the author: the same id from someone else is a new message.
    let other = ok(&store, &r, post_cmd(&bob, "same", "bob's")).await;
    assert!(!other.duplicate);
    assert_ne!(other.message_id, first.message_id);

    let page = store.messages(&r, None, None, 50).await.expect("messages");
    assert_eq!(page.messages.len(), 3);
    assert_eq!(page.messages[0].text, "hello", "a repeat never overwrites");
    assert_eq!(head(&store, &r).await, 4);
    assert_eq!(seqs(&events(&store, &r).await), vec![1, 2, 3, 4]);
}

async fn batch_with_a_refusal_in_the_middle(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    let (foreign, _) = post(&store, &other, &alice, "elsewhere").await;
    let results = store
        .append(vec![
            Write {
                room: r.clone(),
                command: post_cmd(&alice, "1", "one"),
            },
            Write {
                room: r.clone(),
                command: Command::EditMessage {
                    actor: alice.id.clone(),
                    message_id: MessageId::random(),
                    text: "nope".into(),
                },
            },
            Write {
                room: r.clone(),
                command: Command::PostMessage {
                    author: author(&alice),
                    client_msg_id: "reply".into(),
                    text: "reply to another room".into(),
                    reply_to: Some(foreign.clone()),
                },
            },
            Write {
                room: RoomId::random(),
                command: post_cmd(&alice, "2", "lost"),
            },
            Write {
                room: r.clone(),
                command: post_cmd(&alice, "3", "three"),
            },
        ])
        .await
        .expect("backend up");
    assert_eq!(results.len(), 5);
    assert_eq!(results[0].as_ref().expect("first applies").seq, 2);
    assert_eq!(refused(results[1].clone()), ErrorCode::MessageNotFound);
    assert_eq!(refused(results[2].clone()), ErrorCode::MessageNotFound);
    assert_eq!(refused(results[3].clone()), ErrorCode::RoomNotFound);
    assert_eq!(
        results[4].as_ref().expect("last applies").seq,
        3,
        "refusals take no seq"
    );
    assert_eq!(seqs(&events(&store, &r).await), vec![1, 2, 3]);
    let texts: Vec<String> = store
        .messages(&r, None, None, 50)
        .await
        .expect("messages")
        .messages
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, vec!["one", "three"]);
    // A refused post left no trace: its client_msg_id is still free.
    let retry = ok(
        &store,
        &r,
        Command::PostMessage {
            author: author(&alice),
            client_msg_id: "reply".into(),
            text: "now fine".into(),
            reply_to: Some(
                results[0]
                    .as_ref()
                    .expect("applied")
                    .message_id
                    .clone()
                    .expect("id"),
            ),
        },
    )
    .await;
    assert!(!retry.duplicate);
    assert_eq!(retry.seq, 4);
    assert!(store
        .append(Vec::new())
        .await
        .expect("empty batch")
        .is_empty());
}

async fn edit_is_author_only(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let r = room(&store, &alice).await;
    join(&store, &r, &alice, &bob, Role::Admin).await;
    let (id, _) = post(&store, &r, &alice, "first").await;
    let edit = |actor: &UserRef, text: &str| Command::EditMessage {
        actor: actor.id.clone(),
        message_id: id.clone(),
        text: text.into(),
    };

    assert_eq!(
        refused(one(&store, &r, edit(&bob, "hijack")).await),
        ErrorCode::Forbidden,
        "even an admin cannot edit others"
    );
    let applied = ok(&store, &r, edit(&alice, "second")).await;
    let event = applied.event.expect("an edit appends an event");
    let EventBody::MessageEdited {
        message_id,
        text,
        by,
        ..
    } = &event.event
    else {
        panic!("message.edited")
    };
    assert_eq!((message_id, text.as_str(), by), (&id, "second", &alice.id));
    let page = store.messages(&r, None, None, 10).await.expect("messages");
    let message = page
        .messages
        .iter()
        .find(|m| m.id == id)
        .expect("still listed");
    assert_eq!(message.text, "second");
    assert!(message.edited_at.is_some());

    let other = room(&store, &alice).await;
    assert_eq!(
        refused(one(&store, &other, edit(&alice, "wrong room")).await),
        ErrorCode::MessageNotFound
    );
    ok(
        &store,
        &r,
        Command::DeleteMessage {
            actor: alice.id.clone(),
            actor_is_admin: false,
            message_id: id.clone(),
        },
    )
    .await;
    assert_eq!(
        refused(one(&store, &r, edit(&alice, "after delete")).await),
        ErrorCode::MessageNotFound
    );
}

async fn delete_rules_and_redaction(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let r = room(&store, &alice).await;
    join(&store, &r, &alice, &bob, Role::Member).await;
    join(&store, &r, &alice, &carol, Role::Admin).await;
    let (id, created_seq) = post(&store, &r, &bob, "secret").await;
    ok(
        &store,
        &r,
        Command::EditMessage {
            actor: bob.id.clone(),
            message_id: id.clone(),
            text: "secret 2".into(),
        },
    )
    .await;
    ok(
        &store,
        &r,
        Command::React {
            actor: alice.id.clone(),
            message_id: id.clone(),
            emoji: "👍".into(),
            on: true,
        },
    )
    .await;
    let delete = |actor: &UserRef, admin: bool| Command::DeleteMessage {
        actor: actor.id.clone(),
        actor_is_admin: admin,
        message_id: id.clone(),
    };

    assert_eq!(
        refused(one(&store, &r, delete(&alice, false)).await),
        ErrorCode::Forbidden,
        "a non-admin other member"
    );
    let applied = ok(&store, &r, delete(&carol, true)).await;
    let EventBody::MessageDeleted { message_id, by } =
        &applied.event.as_ref().expect("event").event
    else {
        panic!("message.deleted")
    };
    assert_eq!((message_id, by), (&id, &carol.id));
    assert_eq!(
        refused(one(&store, &r, delete(&bob, false)).await),
        ErrorCode::MessageNotFound,
        "already deleted"
    );
    assert_eq!(
        refused(
            one(
                &store,
                &r,
                Command::React {
                    actor: alice.id.clone(),
                    message_id: id.clone(),
                    emoji: "🎉".into(),
                    on: true
                }
            )
            .await
        ),
        ErrorCode::MessageNotFound
    );

    // The text is gone from the replayable log...
    let log = events(&store, &r).await;
    let created = log
        .iter()
        .find(|event| event.seq == created_seq)
        .expect("created event kept");
    let EventBody::MessageCreated { message } = &created.event else {
        panic!("message.created")
    };
    assert!(message.text.is_empty() && message.deleted && message.reactions.is_empty());
    for event in &log {
        if let EventBody::MessageEdited { text, .. } = &event.event {
            assert!(text.is_empty(), "edit payloads are redacted");
        }
    }
    assert!(!serde_json::to_string(&log)
        .expect("json")
        .contains("secret"));
    // ...and from history, which keeps a tombstone.
    let page = store.messages(&r, None, None, 10).await.expect("messages");
    let tombstone = page
        .messages
        .iter()
        .find(|m| m.id == id)
        .expect("tombstone listed");
    assert!(tombstone.deleted && tombstone.text.is_empty() && tombstone.reactions.is_empty());

    // Authors delete their own messages without being admins.
    let (own, _) = post(&store, &r, &bob, "mine").await;
    ok(
        &store,
        &r,
        Command::DeleteMessage {
            actor: bob.id.clone(),
            actor_is_admin: false,
            message_id: own,
        },
    )
    .await;
}

async fn reactions_toggle_with_summaries(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let r = room(&store, &alice).await;
    join(&store, &r, &alice, &bob, Role::Member).await;
    let (id, _) = post(&store, &r, &alice, "react to me").await;
    let react = |actor: &UserRef, emoji: &str, on: bool| Command::React {
        actor: actor.id.clone(),
        message_id: id.clone(),
        emoji: emoji.into(),
        on,
    };
    let summary = |applied: &Applied| match &applied
        .event
        .as_ref()
        .expect("a change appends an event")
        .event
    {
        EventBody::ReactionChanged { reactions, .. } => reactions
            .iter()
            .map(|reaction| {
                (
                    reaction.emoji.clone(),
                    reaction.count,
                    reaction.users.clone(),
                )
            })
            .collect::<Vec<_>>(),
        other => panic!("expected reaction.changed, got {other:?}"),
    };

    let first = ok(&store, &r, react(&alice, "👍", true)).await;
    assert_eq!(
        summary(&first),
        vec![("👍".to_owned(), 1, vec![alice.id.clone()])]
    );
    let EventBody::ReactionChanged {
        user,
        on,
        emoji,
        message_id,
        ..
    } = &first.event.as_ref().expect("event").event
    else {
        unreachable!()
    };
    assert_eq!(
        (user, *on, emoji.as_str(), message_id),
        (&alice.id, true, "👍", &id)
    );

    let head_now = head(&store, &r).await;
    let again = ok(&store, &r, react(&alice, "👍", true)).await;
    assert!(again.duplicate && again.event.is_none());
    assert_eq!(again.seq, head_now);
    assert_eq!(head(&store, &r).await, head_now, "a no-op takes no seq");

    tick().await;
    let second = ok(&store, &r, react(&bob, "👍", true)).await;
    assert_eq!(
        summary(&second),
        vec![("👍".to_owned(), 2, vec![alice.id.clone(), bob.id.clone()])]
    );
    tick().await;
    let third = ok(&store, &r, react(&bob, "🎉", true)).await;
    assert_eq!(
        summary(&third)
            .iter()
            .map(|(emoji, count, _)| (emoji.as_str(), *count))
            .collect::<Vec<_>>(),
        vec![("👍", 2), ("🎉", 1)]
    );

    let off = ok(&store, &r, react(&alice, "👍", false)).await;
    assert_eq!(
        summary(&off),
        vec![
            ("👍".to_owned(), 1, vec![bob.id.clone()]),
            ("🎉".to_owned(), 1, vec![bob.id.clone()])
        ]
    );
    let off_again = ok(&store, &r, react(&alice, "👍", false)).await;
    assert!(off_again.duplicate && off_again.event.is_none());

    let page = store.messages(&r, None, None, 10).await.expect("messages");
    let message = page.messages.iter().find(|m| m.id == id).expect("listed");
    assert_eq!(message.reactions.len(), 2);
    assert_eq!(
        (
            message.reactions[0].emoji.as_str(),
            message.reactions[0].count
        ),
        ("👍", 1)
    );
    assert_eq!(message.reactions[0].users, vec![bob.id.clone()]);
    assert_eq!(
        refused(
            one(
                &store,
                &r,
                Command::React {
                    actor: alice.id.clone(),
                    message_id: MessageId::random(),
                    emoji: "👍".into(),
                    on: true
                }
            )
            .await
        ),
        ErrorCode::MessageNotFound
    );
}

async fn invites_limits_expiry_and_membership(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    let dave = user(&store, "dave").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    let join_cmd = |user: &UserRef, code: &str| Command::JoinByInvite {
        user: user.clone(),
        code: code.to_owned(),
    };

    let once = invite(&store, &r, &alice, Role::Guest, Some(1), None).await;
    assert_eq!(
        store.invite_room(&once).await.expect("lookup"),
        Some(r.clone())
    );
    assert_eq!(
        store.invite_room("no-such-code").await.expect("lookup"),
        None
    );

    // Already a member: nothing changes and no use is consumed.
    let noop = ok(&store, &r, join_cmd(&alice, &once)).await;
    assert!(noop.duplicate && noop.event.is_none());
    assert_eq!(noop.role, Some(Role::Owner));
    assert_eq!(noop.seq, head(&store, &r).await);

    let joined = ok(&store, &r, join_cmd(&bob, &once)).await;
    assert_eq!(joined.role, Some(Role::Guest));
    let EventBody::MemberJoined { user, role } = &joined.event.as_ref().expect("event").event
    else {
        panic!("member.joined")
    };
    assert_eq!((&user.id, *role), (&bob.id, Role::Guest));
    assert_eq!(
        store.member_role(&r, &bob.id).await.expect("role"),
        Some(Role::Guest)
    );
    assert_eq!(
        refused(one(&store, &r, join_cmd(&carol, &once)).await),
        ErrorCode::InviteInvalid,
        "used up"
    );
    // ...but a member accepting it again is still answered with their role (idempotent).
    let again = ok(&store, &r, join_cmd(&bob, &once)).await;
    assert_eq!((again.duplicate, again.role), (true, Some(Role::Guest)));

    let expired = invite(
        &store,
        &r,
        &alice,
        Role::Member,
        None,
        Some(Timestamp(Timestamp::now().millis() - 1000)),
    )
    .await;
    assert_eq!(
        refused(one(&store, &r, join_cmd(&carol, &expired)).await),
        ErrorCode::InviteInvalid
    );
    let future = invite(
        &store,
        &r,
        &alice,
        Role::Member,
        None,
        Some(Timestamp(Timestamp::now().millis() + 3_600_000)),
    )
    .await;
    assert_eq!(
        refused(one(&store, &other, join_cmd(&carol, &future)).await),
        ErrorCode::InviteInvalid,
        "another room's invite"
    );
    assert_eq!(
        refused(one(&store, &r, join_cmd(&carol, "no-such-code")).await),
        ErrorCode::InviteInvalid
    );
    assert!(store
        .member_role(&r, &carol.id)
        .await
        .expect("role")
        .is_none());

    // Unlimited invites keep working.
    ok(&store, &r, join_cmd(&carol, &future)).await;
    ok(&store, &r, join_cmd(&dave, &future)).await;

    // Two uses: a member re-accepting does not burn one.
    let twice = invite(&store, &other, &alice, Role::Member, Some(2), None).await;
    ok(&store, &other, join_cmd(&bob, &twice)).await;
    assert!(ok(&store, &other, join_cmd(&bob, &twice)).await.duplicate);
    ok(&store, &other, join_cmd(&carol, &twice)).await;
    assert_eq!(
        refused(one(&store, &other, join_cmd(&dave, &twice)).await),
        ErrorCode::InviteInvalid
    );
}

async fn kick_and_leave_rules(store: Arc<dyn Store>) {
    let owner = user(&store, "owner").await;
    let admin = user(&store, "admin").await;
    let admin2 = user(&store, "admin2").await;
    let member = user(&store, "member").await;
    let guest = user(&store, "guest").await;
    let outsider = user(&store, "outsider").await;
    let r = room(&store, &owner).await;
    join(&store, &r, &owner, &admin, Role::Admin).await;
    join(&store, &r, &owner, &admin2, Role::Admin).await;
    join(&store, &r, &owner, &member, Role::Member).await;
    join(&store, &r, &owner, &guest, Role::Guest).await;
    let remove = |actor: &UserRef, user: &UserRef| Command::RemoveMember {
        actor: actor.id.clone(),
        user: user.id.clone(),
    };

    assert_eq!(
        refused(one(&store, &r, remove(&member, &guest)).await),
        ErrorCode::Forbidden,
        "members cannot kick"
    );
    assert_eq!(
        refused(one(&store, &r, remove(&admin, &admin2)).await),
        ErrorCode::Forbidden,
        "not an equal"
    );
    assert_eq!(
        refused(one(&store, &r, remove(&admin, &owner)).await),
        ErrorCode::Forbidden,
        "not someone above"
    );
    assert_eq!(
        refused(one(&store, &r, remove(&outsider, &guest)).await),
        ErrorCode::RoomNotFound
    );
    assert_eq!(
        refused(one(&store, &r, remove(&admin, &outsider)).await),
        ErrorCode::UserNotFound
    );
    assert_eq!(
        refused(one(&store, &r, remove(&owner, &owner)).await),
        ErrorCode::Conflict,
        "the last owner stays"
    );

    let kicked = ok(&store, &r, remove(&admin, &member)).await;
    let EventBody::MemberLeft { user, reason, by } = &kicked.event.as_ref().expect("event").event
    else {
        panic!("member.left")
    };
    assert_eq!(
        (user, *reason, by),
        (&member, LeaveReason::Kicked, &admin.id)
    );
    assert!(store
        .member_role(&r, &member.id)
        .await
        .expect("role")
        .is_none());
    let left = ok(&store, &r, remove(&guest, &guest)).await;
    let EventBody::MemberLeft { reason, .. } = &left.event.as_ref().expect("event").event else {
        panic!("member.left")
    };
    assert_eq!(*reason, LeaveReason::Left);
    ok(&store, &r, remove(&owner, &admin2)).await;

    // With a second owner, the first may leave.
    ok(
        &store,
        &r,
        Command::ChangeRole {
            actor: owner.id.clone(),
            user: admin.id.clone(),
            role: Role::Owner,
        },
    )
    .await;
    ok(&store, &r, remove(&owner, &owner)).await;
    let state = store.room_state(&r).await.expect("state").expect("room");
    assert_eq!(state.members.len(), 1);
    assert_eq!(
        state.members.get(&admin.id).map(|(_, role)| *role),
        Some(Role::Owner)
    );
    assert_eq!(
        seqs(&events(&store, &r).await),
        (1..=state.head_seq).collect::<Vec<_>>()
    );
}

async fn role_change_rules(store: Arc<dyn Store>) {
    let owner = user(&store, "owner").await;
    let admin = user(&store, "admin").await;
    let admin2 = user(&store, "admin2").await;
    let member = user(&store, "member").await;
    let outsider = user(&store, "outsider").await;
    let r = room(&store, &owner).await;
    join(&store, &r, &owner, &admin, Role::Admin).await;
    join(&store, &r, &owner, &admin2, Role::Admin).await;
    join(&store, &r, &owner, &member, Role::Member).await;
    let change = |actor: &UserRef, user: &UserRef, role: Role| Command::ChangeRole {
        actor: actor.id.clone(),
        user: user.id.clone(),
        role,
    };

    assert_eq!(
        refused(one(&store, &r, change(&admin, &member, Role::Owner)).await),
        ErrorCode::Forbidden,
        "never above your own role"
    );
    assert_eq!(
        refused(one(&store, &r, change(&admin, &admin2, Role::Member)).await),
        ErrorCode::Forbidden,
        "not an equal"
    );
    assert_eq!(
        refused(one(&store, &r, change(&admin, &owner, Role::Admin)).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        refused(one(&store, &r, change(&member, &member, Role::Admin)).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        refused(one(&store, &r, change(&outsider, &member, Role::Guest)).await),
        ErrorCode::RoomNotFound
    );
    assert_eq!(
        refused(one(&store, &r, change(&owner, &outsider, Role::Guest)).await),
        ErrorCode::UserNotFound
    );
    assert_eq!(
        refused(one(&store, &r, change(&owner, &member, Role::Ai)).await),
        ErrorCode::Validation
    );
    assert_eq!(
        refused(one(&store, &r, change(&owner, &owner, Role::Admin)).await),
        ErrorCode::Conflict,
        "last owner"
    );

    let before = head(&store, &r).await;
    let same = ok(&store, &r, change(&admin, &member, Role::Member)).await;
    assert!(same.duplicate && same.event.is_none());
    assert_eq!((same.seq, head(&store, &r).await), (before, before));

    let promoted = ok(&store, &r, change(&admin, &member, Role::Admin)).await;
    let EventBody::MemberRoleChanged { user, role, by } =
        &promoted.event.as_ref().expect("event").event
    else {
        panic!("member.role_changed")
    };
    assert_eq!((user, *role, by), (&member, Role::Admin, &admin.id));
    assert_eq!(promoted.seq, before + 1);
    assert_eq!(
        store.member_role(&r, &member.id).await.expect("role"),
        Some(Role::Admin)
    );

    // Owners re-rank anyone, including demoting themselves once another owner exists.
    ok(&store, &r, change(&owner, &admin2, Role::Owner)).await;
    ok(&store, &r, change(&owner, &owner, Role::Guest)).await;
    assert_eq!(
        store.member_role(&r, &owner.id).await.expect("role"),
        Some(Role::Guest)
    );
}

async fn unread_counts_follow_the_read_marker(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let outsider = user(&store, "outsider").await;
    let first = room(&store, &alice).await;
    tick().await;
    let second = room(&store, &alice).await;
    join(&store, &first, &alice, &bob, Role::Member).await;
    join(&store, &second, &alice, &bob, Role::Member).await;
    let (_, s1) = post(&store, &first, &alice, "1").await;
    let (_, s2) = post(&store, &first, &alice, "2").await;
    let (m3, _) = post(&store, &first, &alice, "3").await;
    post(&store, &first, &bob, "bob's own").await;

    let listing = |user: UserRef| {
        let store = store.clone();
        async move { store.rooms_for_user(&user.id).await.expect("rooms") }
    };
    let rooms = listing(bob.clone()).await;
    assert_eq!(
        rooms.iter().map(|l| l.room.id.clone()).collect::<Vec<_>>(),
        vec![first.clone(), second.clone()],
        "creation order"
    );
    assert_eq!(
        (rooms[0].unread, rooms[0].last_read_seq, rooms[0].role),
        (3, 0, Role::Member)
    );
    assert_eq!(rooms[1].unread, 0);
    assert_eq!(
        listing(alice.clone()).await[0].unread,
        1,
        "own messages are never unread"
    );
    assert!(listing(outsider.clone()).await.is_empty());

    assert_eq!(
        store.mark_read(&first, &bob.id, s2).await.expect("mark"),
        s2
    );
    assert_eq!(listing(bob.clone()).await[0].unread, 1);
    assert_eq!(
        store.mark_read(&first, &bob.id, s1).await.expect("mark"),
        s2,
        "never moves back"
    );
    assert_eq!(listing(bob.clone()).await[0].last_read_seq, s2);

    ok(
        &store,
        &first,
        Command::DeleteMessage {
            actor: alice.id.clone(),
            actor_is_admin: true,
            message_id: m3,
        },
    )
    .await;
    assert_eq!(
        listing(bob.clone()).await[0].unread,
        0,
        "deleted messages are not unread"
    );

    let last = head(&store, &first).await;
    assert_eq!(
        store
            .mark_read(&first, &bob.id, last + 100)
            .await
            .expect("mark"),
        last,
        "capped at the head"
    );
    assert_eq!(
        store_code(store.mark_read(&first, &outsider.id, 1).await),
        ErrorCode::RoomNotFound
    );
    assert_eq!(
        store_code(store.mark_read(&RoomId::random(), &bob.id, 1).await),
        ErrorCode::RoomNotFound
    );
}

async fn message_paging(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    for text in ["m2", "m3", "m4", "m5", "m6"] {
        post(&store, &r, &alice, text).await;
    }
    let page = |before: Option<Seq>, after: Option<Seq>, limit: u32| {
        let (store, r) = (store.clone(), r.clone());
        async move {
            let page = store
                .messages(&r, before, after, limit)
                .await
                .expect("messages");
            (
                page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                page.has_more,
            )
        }
    };
    assert_eq!(
        page(None, None, 3).await,
        (vec![4, 5, 6], true),
        "newest, in seq order"
    );
    assert_eq!(page(None, None, 10).await, (vec![2, 3, 4, 5, 6], false));
    assert_eq!(page(Some(4), None, 3).await, (vec![2, 3], false));
    assert_eq!(page(Some(4), None, 1).await, (vec![3], true));
    assert_eq!(
        page(None, Some(2), 2).await,
        (vec![3, 4], true),
        "oldest after"
    );
    assert_eq!(page(None, Some(4), 10).await, (vec![5, 6], false));
    assert_eq!(page(None, Some(6), 10).await, (vec![], false));
    assert_eq!(page(Some(2), None, 10).await, (vec![], false));
    // Both bounds: oldest first from `after`, never reaching `before`.
    assert_eq!(page(Some(6), Some(2), 2).await, (vec![3, 4], true));
    assert_eq!(page(Some(5), Some(2), 10).await, (vec![3, 4], false));
    let full = store.messages(&r, None, None, 1).await.expect("messages");
    let message = &full.messages[0];
    assert_eq!(
        (message.text.as_str(), &message.author, message.room.clone()),
        ("m6", &author(&alice), r.clone())
    );
    assert!(store
        .messages(&RoomId::random(), None, None, 10)
        .await
        .expect("messages")
        .messages
        .is_empty());
}

async fn users_are_unique_case_insensitively(store: Arc<dyn Store>) {
    let created = store
        .create_user("Alice", "Alice A.", "hash-1")
        .await
        .expect("created");
    assert_eq!(created.username, "alice");
    assert_eq!(created.display_name, "Alice A.");
    assert_eq!(
        store_code(store.create_user("ALICE", "other", "hash-2").await),
        ErrorCode::UsernameTaken
    );
    let (found, hash) = store
        .user_by_name("aLiCe")
        .await
        .expect("lookup")
        .expect("found case-insensitively");
    assert_eq!((found.clone(), hash.as_str()), (created.clone(), "hash-1"));
    assert_eq!(
        store.user_by_id(&created.id).await.expect("lookup"),
        Some(created)
    );
    assert!(store.user_by_name("bob").await.expect("lookup").is_none());
    assert!(store
        .user_by_id(&cochat_actors::ids::UserId::random())
        .await
        .expect("lookup")
        .is_none());
    store.ping().await.expect("ping");
}

async fn room_state_members_and_head(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let bob = user(&store, "bob").await;
    let (info, event) = store.create_room("General", &alice).await.expect("room");
    assert_eq!(
        (info.name.as_str(), &info.created_by, info.last_seq),
        ("General", &alice.id, 1)
    );
    assert_eq!(event.seq, 1);
    assert_eq!(
        store.room(&info.id).await.expect("room"),
        Some(info.clone())
    );
    tick().await;
    join(&store, &info.id, &alice, &bob, Role::Member).await;

    let state = store
        .room_state(&info.id)
        .await
        .expect("state")
        .expect("room");
    assert_eq!(state.head_seq, 2);
    assert_eq!(state.members.len(), 2);
    assert_eq!(
        state.members.get(&alice.id),
        Some(&(alice.name.clone(), Role::Owner))
    );
    assert_eq!(
        state.members.get(&bob.id),
        Some(&(bob.name.clone(), Role::Member))
    );

    let members = store.members(&info.id).await.expect("members");
    assert_eq!(
        members
            .iter()
            .map(|m| (m.user.clone(), m.role))
            .collect::<Vec<_>>(),
        vec![(alice.clone(), Role::Owner), (bob.clone(), Role::Member)]
    );
    assert!(members[0].joined_at <= members[1].joined_at);
    assert_eq!(
        store.member_role(&info.id, &bob.id).await.expect("role"),
        Some(Role::Member)
    );
    assert_eq!(
        store
            .member_role(&RoomId::random(), &bob.id)
            .await
            .expect("role"),
        None
    );
}

async fn concurrent_appends_stay_gap_free(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    let mut tasks = Vec::new();
    for task in 0..8 {
        let (store, alice) = (store.clone(), alice.clone());
        let rooms = [r.clone(), other.clone()];
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                // Small batches spanning both rooms, like the group committer sends.
                let batch = rooms
                    .iter()
                    .map(|room| Write {
                        room: room.clone(),
                        command: post_cmd(&alice, &format!("{task}-{i}"), "x"),
                    })
                    .collect();
                let results = store.append(batch).await.expect("backend up");
                assert!(results
                    .iter()
                    .all(|result| result.as_ref().is_ok_and(|applied| !applied.duplicate)));
            }
        }));
    }
    for task in tasks {
        task.await.expect("task does not panic");
    }
    for room in [&r, &other] {
        assert_eq!(
            seqs(&events(&store, room).await),
            (1..=81).collect::<Vec<_>>()
        );
        assert_eq!(head(&store, room).await, 81);
        let page = store
            .messages(room, None, None, 100)
            .await
            .expect("messages");
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (2..=81).collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Runners: every behaviour against every backend, each on a database of its own.

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = crate::common::db::TestDatabase::sqlite();
                    let store = cochat::store::open(&db.url).await.expect("sqlite opens and migrates");
                    super::$name(store).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = crate::common::db::TestDatabase::postgres().await else { return };
                    let store = cochat::store::open(&db.url).await.expect("postgres connects and migrates");
                    super::$name(store).await;
                }
            )*
        }
    };
}

conformance!(
    seq_is_gap_free_and_per_room,
    post_is_idempotent_on_client_msg_id,
    batch_with_a_refusal_in_the_middle,
    edit_is_author_only,
    delete_rules_and_redaction,
    reactions_toggle_with_summaries,
    invites_limits_expiry_and_membership,
    kick_and_leave_rules,
    role_change_rules,
    unread_counts_follow_the_read_marker,
    message_paging,
    users_are_unique_case_insensitively,
    room_state_members_and_head,
    concurrent_appends_stay_gap_free,
);

#[test]
fn the_sqlite_runner_uses_a_temp_dir() {
    let db = TestDatabase::sqlite();
    assert!(db.url.starts_with("sqlite://"));
    assert!(!db.is_postgres());
}
