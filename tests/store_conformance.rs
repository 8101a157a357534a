//! The store conformance suite: one set of behaviours, written once against `Arc<dyn Store>`, run
//! against SQLite (always) and Postgres (when a server is reachable; see `common::db`). Each test
//! gets its own database, so tests run in parallel without seeing each other.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cochat_actors::error::{ErrorCode, StoreError};
use cochat_actors::event::{
    AgentInfo, Author, AuthorKind, EventBody, LeaveReason, Message, StoredEvent, Usage, UserRef,
};
use cochat_actors::ids::{MessageId, Role, RoomId, Seq, UserId};
use cochat_actors::ports::{
    AnswerOutcome, Applied, Command, NewInvite, Partial, Store, UsageTotals, Write, WriteResult,
};
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
// AI agents

fn agent_author(name: &str) -> Author {
    Author {
        id: UserId(format!("ai:{name}")),
        name: name.to_owned(),
        kind: AuthorKind::Ai,
    }
}

fn agent_info(name: &str, model: Option<&str>) -> AgentInfo {
    AgentInfo {
        name: name.to_owned(),
        model: model.map(str::to_owned),
        system_prompt: Some(format!("You are {name}.")),
        provider: None,
    }
}

fn start_cmd(agent: &str, id: &MessageId, trigger: &MessageId, by: &UserRef) -> Command {
    Command::StartAnswer {
        agent: agent.to_owned(),
        message_id: id.clone(),
        trigger_message_id: trigger.clone(),
        trigger_author: by.id.clone(),
    }
}

/// Starts an answer of `agent` to `trigger` and returns its message id.
async fn start(
    store: &Arc<dyn Store>,
    room: &RoomId,
    agent: &str,
    trigger: &MessageId,
    by: &UserRef,
) -> MessageId {
    let id = MessageId::random();
    let applied = ok(store, room, start_cmd(agent, &id, trigger, by)).await;
    assert_eq!(applied.message_id.as_ref(), Some(&id));
    let event = applied.event.expect("ai.started is appended");
    assert_eq!(event.seq, applied.seq);
    assert_eq!(
        event.event,
        EventBody::AiStarted {
            message_id: id.clone(),
            agent: agent.to_owned(),
            trigger_message_id: trigger.clone(),
            trigger_author: by.id.clone(),
        }
    );
    id
}

fn finish_cmd(
    agent: &str,
    id: &MessageId,
    trigger: &MessageId,
    charge_to: &UserRef,
    text: &str,
    outcome: AnswerOutcome,
    usage: Option<Usage>,
) -> Command {
    Command::FinishAnswer {
        author: agent_author(agent),
        message_id: id.clone(),
        trigger_message_id: trigger.clone(),
        charge_to: charge_to.id.clone(),
        text: text.to_owned(),
        outcome,
        usage,
    }
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens,
        completion_tokens,
    })
}

fn totals(prompt_tokens: u64, completion_tokens: u64, answers: u64) -> UsageTotals {
    UsageTotals {
        prompt_tokens,
        completion_tokens,
        answers,
    }
}

/// The message an `ai.completed` / `ai.failed` / `ai.cancelled` event carries.
fn answer_of(applied: &Applied) -> &Message {
    match &applied.event.as_ref().expect("an event").event {
        EventBody::AiCompleted { message, .. }
        | EventBody::AiFailed { message, .. }
        | EventBody::AiCancelled { message, .. } => message,
        other => panic!("expected an answer event, got {other:?}"),
    }
}

async fn agents_are_added_once_per_room(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    assert!(
        store.agents(&r).await.expect("agents").is_empty(),
        "the default agent is implicit, not stored"
    );

    let helper = agent_info("helper", Some("gpt-x"));
    let applied = ok(
        &store,
        &r,
        Command::AddAgent {
            actor: alice.id.clone(),
            agent: helper.clone(),
        },
    )
    .await;
    assert_eq!(applied.seq, 2);
    assert_eq!(
        applied.event.expect("agent.added").event,
        EventBody::AgentAdded {
            agent: helper.clone(),
            by: alice.id.clone()
        }
    );
    let bot = AgentInfo {
        name: "bot".into(),
        model: None,
        system_prompt: None,
        provider: Some("local".into()),
    };
    ok(
        &store,
        &r,
        Command::AddAgent {
            actor: alice.id.clone(),
            agent: bot.clone(),
        },
    )
    .await;
    let default_ai = AgentInfo::default_agent();
    ok(
        &store,
        &r,
        Command::AddAgent {
            actor: alice.id.clone(),
            agent: default_ai.clone(),
        },
    )
    .await;
    assert_eq!(
        store.agents(&r).await.expect("agents"),
        vec![default_ai.clone(), bot, helper.clone()],
        "by name"
    );

    let before = head(&store, &r).await;
    assert_eq!(
        refused(
            one(
                &store,
                &r,
                Command::AddAgent {
                    actor: alice.id.clone(),
                    agent: agent_info("helper", Some("another model")),
                },
            )
            .await
        ),
        ErrorCode::Conflict
    );
    assert_eq!(
        refused(
            one(
                &store,
                &r,
                Command::AddAgent {
                    actor: alice.id.clone(),
                    agent: default_ai,
                },
            )
            .await
        ),
        ErrorCode::Conflict,
        "the default counts once stored"
    );
    assert_eq!(head(&store, &r).await, before, "a refusal appends nothing");
    assert_eq!(
        store.agents(&r).await.expect("agents")[2],
        helper,
        "the first one is kept"
    );

    // Names are per room.
    ok(
        &store,
        &other,
        Command::AddAgent {
            actor: alice.id.clone(),
            agent: agent_info("helper", None),
        },
    )
    .await;
    assert_eq!(
        store.agents(&other).await.expect("agents"),
        vec![agent_info("helper", None)]
    );
    assert_eq!(
        refused(
            one(
                &store,
                &RoomId::random(),
                Command::AddAgent {
                    actor: alice.id.clone(),
                    agent: agent_info("x", None),
                },
            )
            .await
        ),
        ErrorCode::RoomNotFound
    );
}

async fn answer_lifecycle_with_partials_and_usage(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let (trigger, _) = post(&store, &r, &alice, "@helper what is 2+2?").await;

    let id = start(&store, &r, "helper", &trigger, &alice).await;
    assert_eq!(
        refused(one(&store, &r, start_cmd("helper", &id, &trigger, &alice)).await),
        ErrorCode::Conflict,
        "an answer starts once"
    );
    let partial = |text: &str| Partial {
        room: r.clone(),
        message_id: id.clone(),
        agent: "helper".into(),
        trigger_message_id: trigger.clone(),
        trigger_author: alice.id.clone(),
        text: text.to_owned(),
    };
    assert_eq!(
        store.partials(&r).await.expect("partials"),
        vec![partial("")]
    );
    store
        .save_partial(&r, &id, "It is")
        .await
        .expect("checkpoint");
    assert_eq!(
        store.partials(&r).await.expect("partials"),
        vec![partial("It is")]
    );
    store
        .save_partial(&r, &MessageId::random(), "nobody")
        .await
        .expect("an unknown answer is a no-op");
    store
        .save_partial(&RoomId::random(), &id, "wrong room")
        .await
        .expect("another room's answer is a no-op");
    assert_eq!(
        store.partials(&r).await.expect("partials"),
        vec![partial("It is")]
    );
    assert!(store
        .partials(&RoomId::random())
        .await
        .expect("partials")
        .is_empty());

    // Finish, and in the same batch reply to the answer (the post sees it).
    let results = store
        .append(vec![
            Write {
                room: r.clone(),
                command: finish_cmd(
                    "helper",
                    &id,
                    &trigger,
                    &alice,
                    "It is 4.",
                    AnswerOutcome::Completed,
                    usage(10, 5),
                ),
            },
            Write {
                room: r.clone(),
                command: Command::PostMessage {
                    author: author(&alice),
                    client_msg_id: "thanks".into(),
                    text: "thanks".into(),
                    reply_to: Some(id.clone()),
                },
            },
        ])
        .await
        .expect("backend up");
    let finished = results[0].clone().expect("the finish applies");
    results[1].clone().expect("a reply to the answer applies");
    assert_eq!(finished.message_id.as_ref(), Some(&id));
    let event = finished.event.clone().expect("ai.completed");
    let EventBody::AiCompleted {
        message,
        usage: used,
    } = &event.event
    else {
        panic!("expected ai.completed, got {:?}", event.event)
    };
    assert_eq!(*used, usage(10, 5));
    assert_eq!(
        (
            &message.id,
            &message.room,
            message.seq,
            &message.author,
            message.text.as_str()
        ),
        (&id, &r, finished.seq, &agent_author("helper"), "It is 4.")
    );
    assert_eq!(message.reply_to_message.as_ref(), Some(&trigger));
    assert!(!message.deleted && message.edited_at.is_none() && message.reactions.is_empty());
    assert_eq!(message.created_at, event.at);
    assert!(store.partials(&r).await.expect("partials").is_empty());

    // History shows it as the agent's message.
    let page = store.messages(&r, None, None, 10).await.expect("messages");
    let listed = page
        .messages
        .iter()
        .find(|m| m.id == id)
        .expect("the answer is in history");
    assert_eq!(listed, message);
    assert_eq!(listed.author.kind, AuthorKind::Ai);
    assert_eq!(
        store.message(&r, &id).await.expect("message").as_ref(),
        Some(message)
    );
    let log = events(&store, &r).await;
    assert_eq!(
        log.iter().map(|e| e.event.kind()).collect::<Vec<_>>(),
        vec![
            "member.joined",
            "message.created",
            "ai.started",
            "ai.completed",
            "message.created"
        ]
    );
    assert_eq!(log[3], event, "the log keeps the event as applied");

    // The ledger.
    let since = Timestamp(0);
    assert_eq!(
        store.room_usage(&r, since).await.expect("usage"),
        totals(10, 5, 1)
    );
    assert_eq!(
        store.user_usage(&alice.id, since).await.expect("usage"),
        totals(10, 5, 1)
    );
    assert_eq!(
        store.room_usage_by_user(&r, since).await.expect("usage"),
        vec![(alice.id.clone(), totals(10, 5, 1))]
    );

    // Finishing again (a retry) is refused and writes nothing.
    let before = head(&store, &r).await;
    assert_eq!(
        refused(
            one(
                &store,
                &r,
                finish_cmd(
                    "helper",
                    &id,
                    &trigger,
                    &alice,
                    "It is 4.",
                    AnswerOutcome::Completed,
                    usage(10, 5)
                )
            )
            .await
        ),
        ErrorCode::Conflict
    );
    assert_eq!(head(&store, &r).await, before);
    assert_eq!(
        store.room_usage(&r, since).await.expect("usage"),
        totals(10, 5, 1)
    );
    store
        .save_partial(&r, &id, "late delta")
        .await
        .expect("a finished answer's checkpoint is a no-op");
    assert!(store.partials(&r).await.expect("partials").is_empty());
    assert_eq!(
        store
            .message(&r, &id)
            .await
            .expect("message")
            .map(|m| m.text),
        Some("It is 4.".to_owned())
    );

    // Two finishes of one answer in one batch: the second is refused on its own.
    let id2 = start(&store, &r, "helper", &trigger, &alice).await;
    let finish2 = || Write {
        room: r.clone(),
        command: finish_cmd(
            "helper",
            &id2,
            &trigger,
            &alice,
            "again",
            AnswerOutcome::Completed,
            None,
        ),
    };
    let results = store
        .append(vec![finish2(), finish2()])
        .await
        .expect("backend up");
    assert!(results[0].is_ok());
    assert_eq!(refused(results[1].clone()), ErrorCode::Conflict);
    assert_eq!(
        store.room_usage(&r, since).await.expect("usage"),
        totals(10, 5, 1),
        "no usage, no ledger row"
    );

    // Several payers, in several rooms.
    let bob = user(&store, "bob").await;
    let carol = user(&store, "carol").await;
    join(&store, &r, &alice, &bob, Role::Member).await;
    join(&store, &r, &alice, &carol, Role::Member).await;
    for (payer, used) in [
        (&bob, usage(100, 50)),
        (&carol, usage(7, 8)),
        (&bob, usage(1, 1)),
    ] {
        let answer = start(&store, &r, "ai", &trigger, payer).await;
        ok(
            &store,
            &r,
            finish_cmd(
                "ai",
                &answer,
                &trigger,
                payer,
                "ok",
                AnswerOutcome::Completed,
                used,
            ),
        )
        .await;
    }
    let elsewhere = room(&store, &bob).await;
    let (other_trigger, _) = post(&store, &elsewhere, &bob, "@ai hi").await;
    let answer = start(&store, &elsewhere, "ai", &other_trigger, &bob).await;
    ok(
        &store,
        &elsewhere,
        finish_cmd(
            "ai",
            &answer,
            &other_trigger,
            &bob,
            "hi",
            AnswerOutcome::Completed,
            usage(1000, 1000),
        ),
    )
    .await;
    assert_eq!(
        store.room_usage(&r, since).await.expect("usage"),
        totals(118, 64, 4)
    );
    assert_eq!(
        store.room_usage(&r, since).await.expect("usage").total(),
        182
    );
    assert_eq!(
        store.user_usage(&bob.id, since).await.expect("usage"),
        totals(1101, 1051, 3),
        "a user's usage spans rooms"
    );
    // Total desc, then user id: alice and carol both used 15.
    let mut tied = vec![
        (alice.id.clone(), totals(10, 5, 1)),
        (carol.id.clone(), totals(7, 8, 1)),
    ];
    tied.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected = vec![(bob.id.clone(), totals(101, 51, 2))];
    expected.extend(tied);
    assert_eq!(
        store.room_usage_by_user(&r, since).await.expect("usage"),
        expected
    );
    assert_eq!(
        store
            .room_usage(&RoomId::random(), since)
            .await
            .expect("usage"),
        UsageTotals::default()
    );
}

async fn cancelled_and_failed_answers(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let (trigger, _) = post(&store, &r, &alice, "@ai write a poem").await;

    // Cancelled before any text: an event, no message.
    let cancelled = start(&store, &r, "ai", &trigger, &alice).await;
    let applied = ok(
        &store,
        &r,
        finish_cmd(
            "ai",
            &cancelled,
            &trigger,
            &alice,
            "",
            AnswerOutcome::Cancelled {
                by: alice.id.clone(),
            },
            None,
        ),
    )
    .await;
    let EventBody::AiCancelled { message, by } = &applied.event.as_ref().expect("event").event
    else {
        panic!("ai.cancelled")
    };
    assert_eq!(by, &alice.id);
    assert_eq!(
        (&message.id, message.seq, message.text.as_str()),
        (&cancelled, applied.seq, "")
    );
    assert_eq!(store.message(&r, &cancelled).await.expect("message"), None);
    assert!(store.partials(&r).await.expect("partials").is_empty());

    // Failed after some text: the text is kept as a message.
    let failed = start(&store, &r, "ai", &trigger, &alice).await;
    store
        .save_partial(&r, &failed, "Roses are")
        .await
        .expect("checkpoint");
    let applied = ok(
        &store,
        &r,
        finish_cmd(
            "ai",
            &failed,
            &trigger,
            &alice,
            "Roses are",
            AnswerOutcome::Failed {
                code: "provider_error".into(),
                reason: "upstream timed out".into(),
            },
            usage(3, 2),
        ),
    )
    .await;
    let EventBody::AiFailed {
        message,
        code,
        reason,
    } = &applied.event.as_ref().expect("event").event
    else {
        panic!("ai.failed")
    };
    assert_eq!(
        (code.as_str(), reason.as_str()),
        ("provider_error", "upstream timed out")
    );
    let stored = store
        .message(&r, &failed)
        .await
        .expect("message")
        .expect("the streamed text is kept");
    assert_eq!(&stored, message);
    assert_eq!(
        (stored.text.as_str(), stored.author.kind, stored.seq),
        ("Roses are", AuthorKind::Ai, applied.seq)
    );

    // Cancelled after some text: kept too. Failed with nothing: not kept.
    let partly = start(&store, &r, "ai", &trigger, &alice).await;
    ok(
        &store,
        &r,
        finish_cmd(
            "ai",
            &partly,
            &trigger,
            &alice,
            "Violets",
            AnswerOutcome::Cancelled {
                by: alice.id.clone(),
            },
            None,
        ),
    )
    .await;
    let empty_failure = start(&store, &r, "ai", &trigger, &alice).await;
    let applied = ok(
        &store,
        &r,
        finish_cmd(
            "ai",
            &empty_failure,
            &trigger,
            &alice,
            "",
            AnswerOutcome::Failed {
                code: "x".into(),
                reason: "y".into(),
            },
            None,
        ),
    )
    .await;
    assert_eq!(answer_of(&applied).text, "");
    // A completed answer is kept even when empty.
    let empty_done = start(&store, &r, "ai", &trigger, &alice).await;
    ok(
        &store,
        &r,
        finish_cmd(
            "ai",
            &empty_done,
            &trigger,
            &alice,
            "",
            AnswerOutcome::Completed,
            None,
        ),
    )
    .await;
    let history: Vec<MessageId> = store
        .messages(&r, None, None, 50)
        .await
        .expect("messages")
        .messages
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        history,
        vec![trigger.clone(), failed.clone(), partly, empty_done]
    );
    assert_eq!(
        store.room_usage(&r, Timestamp(0)).await.expect("usage"),
        totals(3, 2, 1)
    );

    // Deleting an answer redacts its events like a post's.
    ok(
        &store,
        &r,
        Command::DeleteMessage {
            actor: alice.id.clone(),
            actor_is_admin: true,
            message_id: failed.clone(),
        },
    )
    .await;
    let log = events(&store, &r).await;
    assert!(!serde_json::to_string(&log).expect("json").contains("Roses"));
    let tombstone = store
        .message(&r, &failed)
        .await
        .expect("message")
        .expect("a tombstone");
    assert!(tombstone.deleted && tombstone.text.is_empty());
}

async fn search_messages_is_a_literal_substring(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    let (hello_world, _) = post(&store, &r, &alice, "Hello World").await;
    let (say_hello, _) = post(&store, &r, &alice, "say hello").await;
    let (gone, _) = post(&store, &r, &alice, "hello, deleted").await;
    let (again, _) = post(&store, &r, &alice, "HELLO again").await;
    post(&store, &r, &alice, "goodbye").await;
    let (percent, _) = post(&store, &r, &alice, "100% sure").await;
    post(&store, &r, &alice, "100 percent").await;
    let (snake, _) = post(&store, &r, &alice, "snake_case").await;
    post(&store, &r, &alice, "snakeXcase").await;
    post(&store, &other, &alice, "hello from elsewhere").await;
    ok(
        &store,
        &r,
        Command::React {
            actor: alice.id.clone(),
            message_id: say_hello.clone(),
            emoji: "👋".into(),
            on: true,
        },
    )
    .await;
    ok(
        &store,
        &r,
        Command::DeleteMessage {
            actor: alice.id.clone(),
            actor_is_admin: false,
            message_id: gone,
        },
    )
    .await;

    let search = |query: &str, limit: u32| {
        let (store, r, query) = (store.clone(), r.clone(), query.to_owned());
        async move {
            store
                .search_messages(&r, &query, limit)
                .await
                .expect("search")
        }
    };
    let ids = |messages: Vec<Message>| messages.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(search("hello", 10).await),
        vec![again.clone(), say_hello.clone(), hello_world.clone()],
        "case-insensitive, newest first, without the deleted one or other rooms"
    );
    assert_eq!(
        ids(search("hElLo", 2).await),
        vec![again, say_hello.clone()]
    );
    assert_eq!(ids(search("%", 10).await), vec![percent.clone()]);
    assert_eq!(ids(search("0% s", 10).await), vec![percent]);
    assert_eq!(ids(search("e_c", 10).await), vec![snake]);
    assert!(search("nothing like it", 10).await.is_empty());
    let found = search("say", 10).await;
    assert_eq!(found.len(), 1);
    assert_eq!(
        (
            found[0].text.as_str(),
            found[0].author.clone(),
            found[0].room.clone()
        ),
        ("say hello", author(&alice), r.clone())
    );
    assert_eq!(found[0].reactions.len(), 1, "reactions are filled in");
    assert!(store
        .search_messages(&RoomId::random(), "hello", 10)
        .await
        .expect("search")
        .is_empty());
}

async fn message_lookup_by_id(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    let (id, seq) = post(&store, &r, &alice, "look me up").await;
    let (elsewhere, _) = post(&store, &other, &alice, "not here").await;
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
    let found = store
        .message(&r, &id)
        .await
        .expect("message")
        .expect("found");
    assert_eq!(
        (
            found.text.as_str(),
            found.seq,
            found.author.clone(),
            found.deleted
        ),
        ("look me up", seq, author(&alice), false)
    );
    assert_eq!(found.reactions.len(), 1);
    assert_eq!(found.reactions[0].users, vec![alice.id.clone()]);
    assert_eq!(
        store
            .message(&r, &MessageId::random())
            .await
            .expect("message"),
        None
    );
    assert_eq!(
        store.message(&r, &elsewhere).await.expect("message"),
        None,
        "another room's message"
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
    let tombstone = store
        .message(&r, &id)
        .await
        .expect("message")
        .expect("a tombstone");
    assert!(tombstone.deleted && tombstone.text.is_empty() && tombstone.reactions.is_empty());
}

async fn summaries_are_upserted(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let other = room(&store, &alice).await;
    assert_eq!(store.summary(&r, "ai").await.expect("summary"), None);
    store
        .save_summary(&r, "ai", "they said hi", 5)
        .await
        .expect("saved");
    assert_eq!(
        store.summary(&r, "ai").await.expect("summary"),
        Some(("they said hi".to_owned(), 5))
    );
    store
        .save_summary(&r, "ai", "they said hi, then bye", 9)
        .await
        .expect("replaced");
    assert_eq!(
        store.summary(&r, "ai").await.expect("summary"),
        Some(("they said hi, then bye".to_owned(), 9))
    );
    assert_eq!(store.summary(&r, "helper").await.expect("summary"), None);
    assert_eq!(store.summary(&other, "ai").await.expect("summary"), None);
    store
        .save_summary(&r, "helper", "other view", 3)
        .await
        .expect("saved");
    assert_eq!(
        store.summary(&r, "ai").await.expect("summary"),
        Some(("they said hi, then bye".to_owned(), 9)),
        "per agent"
    );
}

async fn usage_since_excludes_older_rows(store: Arc<dyn Store>) {
    let alice = user(&store, "alice").await;
    let r = room(&store, &alice).await;
    let (trigger, _) = post(&store, &r, &alice, "@ai hi").await;
    let before = Timestamp::now();
    for _ in 0..2 {
        let id = start(&store, &r, "ai", &trigger, &alice).await;
        ok(
            &store,
            &r,
            finish_cmd(
                "ai",
                &id,
                &trigger,
                &alice,
                "hi",
                AnswerOutcome::Completed,
                usage(4, 6),
            ),
        )
        .await;
    }
    assert_eq!(
        store.room_usage(&r, before).await.expect("usage"),
        totals(8, 12, 2),
        "since is inclusive"
    );
    let future = Timestamp(Timestamp::now().millis() + 60_000);
    assert_eq!(
        store.room_usage(&r, future).await.expect("usage"),
        UsageTotals::default()
    );
    assert_eq!(
        store.user_usage(&alice.id, future).await.expect("usage"),
        UsageTotals::default()
    );
    assert!(store
        .room_usage_by_user(&r, future)
        .await
        .expect("usage")
        .is_empty());
    assert_eq!(
        store.user_usage(&alice.id, before).await.expect("usage"),
        totals(8, 12, 2)
    );
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
    agents_are_added_once_per_room,
    answer_lifecycle_with_partials_and_usage,
    cancelled_and_failed_answers,
    search_messages_is_a_literal_substring,
    message_lookup_by_id,
    summaries_are_upserted,
    usage_since_excludes_older_rows,
);

#[test]
fn the_sqlite_runner_uses_a_temp_dir() {
    let db = TestDatabase::sqlite();
    assert!(db.url.starts_with("sqlite://"));
    assert!(!db.is_postgres());
}
