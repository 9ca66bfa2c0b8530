//! Rooms, members, idempotent messages, history ranges and retention, on both backends.

use chrono::{DateTime, Duration, Utc};
use unhidra_core::{Email, Role, UserId};
use unhidra_store::identity::NewUser;
use unhidra_store::rooms::{
    MessageRange, NewMessage, RoomChange, RoomRecord, RoomRole, Visibility,
};
use unhidra_store::testing::TestDb;
use unhidra_store::{StoreError, both_backends};
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

async fn user(db: &TestDb, email: &str) -> UserId {
    let id = UserId::new();
    db.store
        .create_user(&NewUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: None,
            password_hash: "x".into(),
            role: Role::User,
            now: now(),
        })
        .await
        .unwrap();
    id
}

async fn room(db: &TestDb, owner: UserId, name: &str, visibility: Visibility) -> Uuid {
    let id = Uuid::new_v4();
    db.store
        .create_room(
            &RoomRecord {
                id,
                name: name.to_owned(),
                visibility,
                created_by: Some(owner),
                created_at: now(),
                retention_max_age: None,
                retention_max_count: None,
            },
            owner,
        )
        .await
        .unwrap();
    id
}

fn range(before: Option<i64>, after: Option<i64>, limit: u32) -> MessageRange {
    MessageRange {
        before,
        after,
        limit,
        max_bytes: None,
    }
}

async fn rooms_and_members(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let ann = user(db, "ann@example.com").await;
    let bo = user(db, "bo@example.com").await;
    let public = room(db, ann, "lobby", Visibility::Public).await;
    let private = room(db, ann, "secret", Visibility::Private).await;
    assert_eq!(
        db.store.room_role(public, ann).await.unwrap(),
        Some(RoomRole::Owner)
    );
    assert_eq!(db.store.room_role(public, bo).await.unwrap(), None);
    let (found, role) = db.store.room_with_role(private, ann).await.unwrap();
    assert_eq!(
        (found.name.as_str(), role),
        ("secret", Some(RoomRole::Owner))
    );
    let (found, role) = db.store.room_with_role(public, bo).await.unwrap();
    assert_eq!((found.id, role), (public, None));
    assert!(matches!(
        db.store.room_with_role(Uuid::new_v4(), ann).await,
        Err(StoreError::NotFound { .. })
    ));

    // Bo sees the public room only, without a role; Ann sees both as owner.
    let seen: Vec<(String, Option<RoomRole>)> = db
        .store
        .visible_rooms(bo)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.room.name, l.role))
        .collect();
    assert_eq!(seen, [("lobby".to_owned(), None)]);
    assert_eq!(db.store.visible_rooms(ann).await.unwrap().len(), 2);

    db.store
        .put_member(private, bo, RoomRole::Member, now())
        .await
        .unwrap();
    db.store
        .put_member(private, bo, RoomRole::Admin, now())
        .await
        .unwrap();
    assert_eq!(
        db.store.room_role(private, bo).await.unwrap(),
        Some(RoomRole::Admin)
    );
    let members = db.store.members(private).await.unwrap();
    assert_eq!(members, [(ann, RoomRole::Owner), (bo, RoomRole::Admin)]);
    assert!(db.store.remove_member(private, bo).await.unwrap());
    assert!(!db.store.remove_member(private, bo).await.unwrap());
    assert!(
        matches!(
            db.store
                .put_member(Uuid::new_v4(), bo, RoomRole::Member, now())
                .await,
            Err(StoreError::Conflict { .. })
        ),
        "no member of a room that does not exist"
    );

    let changed = db
        .store
        .update_room(
            private,
            &RoomChange {
                name: Some("hidden".into()),
                retention_max_count: Some(Some(10)),
                ..RoomChange::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            changed.name.as_str(),
            changed.visibility,
            changed.retention_max_count
        ),
        ("hidden", Visibility::Private, Some(10))
    );
    let cleared = db
        .store
        .update_room(
            private,
            &RoomChange {
                retention_max_count: Some(None),
                ..RoomChange::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(cleared.retention_max_count, None);
    assert_eq!(cleared.name, "hidden");
}
both_backends!(rooms_and_members);

async fn messages_are_stored_once_and_read_in_ranges(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let ann = user(db, "ann@example.com").await;
    let lobby = room(db, ann, "lobby", Visibility::Public).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let (stored, new) = db
            .store
            .append_message(lobby, ann, &format!("c{i}"), &format!("hello {i}"), now())
            .await
            .unwrap();
        assert!(new);
        ids.push(stored.id);
    }
    // A retry with the same client id returns the same message and stores nothing.
    let (again, new) = db
        .store
        .append_message(lobby, ann, "c3", "different body", now())
        .await
        .unwrap();
    assert!(!new);
    assert_eq!((again.id, again.body.as_str()), (ids[3], "hello 3"));

    let newest = db
        .store
        .messages(lobby, range(None, None, 3))
        .await
        .unwrap();
    assert_eq!(newest.iter().map(|m| m.id).collect::<Vec<_>>(), ids[7..]);
    let older = db
        .store
        .messages(lobby, range(Some(ids[7]), None, 3))
        .await
        .unwrap();
    assert_eq!(older.iter().map(|m| m.id).collect::<Vec<_>>(), ids[4..7]);
    let after = db
        .store
        .messages(lobby, range(None, Some(ids[2]), 2))
        .await
        .unwrap();
    assert_eq!(after.iter().map(|m| m.id).collect::<Vec<_>>(), ids[3..5]);
    let between = db
        .store
        .messages(lobby, range(Some(ids[6]), Some(ids[2]), 50))
        .await
        .unwrap();
    assert_eq!(between.iter().map(|m| m.id).collect::<Vec<_>>(), ids[3..6]);

    db.store.delete_room(lobby).await.unwrap();
    assert!(
        db.store
            .messages(lobby, range(None, None, 50))
            .await
            .unwrap()
            .is_empty(),
        "messages go with the room"
    );
    assert!(matches!(
        db.store.delete_room(lobby).await,
        Err(StoreError::NotFound { .. })
    ));
}
both_backends!(messages_are_stored_once_and_read_in_ranges);

/// A page bounded in bytes reads, from the cursor outward, up to the message that takes the
/// bodies past the bound, and at least two: enough for the reply to see that there is more.
async fn a_page_bounded_in_bytes_stops_reading_past_the_bound(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let ann = user(db, "ann@example.com").await;
    let lobby = room(db, ann, "lobby", Visibility::Public).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        // Ten bytes each, "é" counting two.
        let body = format!("{i}{}", "é".repeat(4) + "x");
        assert_eq!(body.len(), 10);
        let (stored, _) = db
            .store
            .append_message(lobby, ann, &format!("c{i}"), &body, now())
            .await
            .unwrap();
        ids.push(stored.id);
    }
    let read = |before, after, max_bytes| {
        let range = MessageRange {
            max_bytes: Some(max_bytes),
            ..range(before, after, 50)
        };
        async move {
            db.store
                .messages(lobby, range)
                .await
                .unwrap()
                .iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        }
    };
    // Newest first from the end: 25 bytes are passed by the third message back.
    assert_eq!(read(None, None, 25).await, ids[7..]);
    assert_eq!(
        read(None, None, 30).await,
        ids[6..],
        "30 bytes are passed by the fourth"
    );
    assert_eq!(read(Some(ids[5]), None, 15).await, ids[3..5]);
    // Forward from `after`, oldest first.
    assert_eq!(read(None, Some(ids[1]), 19).await, ids[2..4]);
    // One message over the bound alone still comes with the next one.
    assert_eq!(read(None, Some(ids[1]), 1).await, ids[2..4]);
    assert_eq!(
        read(None, Some(ids[8]), 1).await,
        ids[9..],
        "and the last alone"
    );
    // Enough bytes for all: the limit is what stops.
    assert_eq!(read(None, None, 1_000).await, ids);
}
both_backends!(a_page_bounded_in_bytes_stops_reading_past_the_bound);

async fn a_group_of_messages_is_stored_in_order_and_once(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let ann = user(db, "ann@example.com").await;
    let lobby = room(db, ann, "lobby", Visibility::Public).await;
    let (first, _) = db
        .store
        .append_message(lobby, ann, "a", "alpha", now())
        .await
        .unwrap();
    let item = |client_msg_id, body| NewMessage {
        client_msg_id,
        body,
    };
    let stored = db
        .store
        .append_messages(
            lobby,
            ann,
            &[
                item("b", "bravo"),
                item("a", "a retry of alpha"),
                item("c", "charlie"),
                item("b", "a retry of bravo in the same group"),
                item("d", "delta"),
            ],
            now(),
        )
        .await
        .unwrap();
    let seen: Vec<(&str, &str, bool)> = stored
        .iter()
        .map(|(m, new)| (m.client_msg_id.as_str(), m.body.as_str(), *new))
        .collect();
    assert_eq!(
        seen,
        [
            ("b", "bravo", true),
            ("a", "alpha", false),
            ("c", "charlie", true),
            ("b", "bravo", false),
            ("d", "delta", true),
        ]
    );
    // Ids follow the order of the group, after what was there.
    let (b, c, d) = (stored[0].0.id, stored[2].0.id, stored[4].0.id);
    assert!(first.id < b && b < c && c < d, "{first:?} {stored:?}");
    assert_eq!(stored[1].0.id, first.id);
    assert_eq!(stored[3].0.id, b);
    let all = db
        .store
        .messages(lobby, range(None, None, 10))
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["alpha", "bravo", "charlie", "delta"]
    );
    assert!(
        db.store
            .append_messages(lobby, ann, &[], now())
            .await
            .unwrap()
            .is_empty()
    );
}

both_backends!(a_group_of_messages_is_stored_in_order_and_once);

async fn retention_by_count_and_age(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let ann = user(db, "ann@example.com").await;
    let by_count = room(db, ann, "a", Visibility::Public).await;
    let by_age = room(db, ann, "b", Visibility::Public).await;
    let untouched = room(db, ann, "c", Visibility::Public).await;
    db.store
        .update_room(
            by_count,
            &RoomChange {
                retention_max_count: Some(Some(3)),
                ..RoomChange::default()
            },
        )
        .await
        .unwrap();
    db.store
        .update_room(
            by_age,
            &RoomChange {
                retention_max_age: Some(Some(3600)),
                ..RoomChange::default()
            },
        )
        .await
        .unwrap();
    let old = now() - Duration::hours(2);
    for i in 0..5 {
        for (room, at) in [
            (by_count, now()),
            (by_age, if i < 2 { old } else { now() }),
            (untouched, old),
        ] {
            db.store
                .append_message(room, ann, &format!("c{i}"), "x", at)
                .await
                .unwrap();
        }
    }
    let deleted = db.store.apply_retention(now()).await.unwrap();
    assert_eq!(deleted, 2 + 2);
    let count = |room| async move {
        db.store
            .messages(room, range(None, None, 100))
            .await
            .unwrap()
            .len()
    };
    assert_eq!(count(by_count).await, 3);
    assert_eq!(count(by_age).await, 3);
    assert_eq!(count(untouched).await, 5);
}
both_backends!(retention_by_count_and_age);

async fn search_finds_words_in_rooms_the_user_belongs_to(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let ann = user(db, "ann@example.com").await;
    let bo = user(db, "bo@example.com").await;
    let ours = room(db, ann, "ours", Visibility::Public).await;
    let theirs = room(db, bo, "theirs", Visibility::Private).await;
    for (room, sender, id, body) in [
        (
            ours,
            ann,
            "1",
            "The quick brown fox jumps over the lazy dog",
        ),
        (ours, ann, "2", "A quick note about the release"),
        (ours, ann, "3", "Nothing to see here"),
        (theirs, bo, "4", "quick secret plans"),
    ] {
        db.store
            .append_message(room, sender, id, body, now())
            .await
            .unwrap();
    }
    let hits = db
        .store
        .search_messages(ann, "quick", None, 10)
        .await
        .unwrap();
    assert_eq!(hits.len(), 2, "only rooms Ann belongs to: {hits:?}");
    assert!(
        hits.iter().all(|h| h.snippet.contains("<mark>quick</mark>")
            || h.snippet.contains("<mark>Quick</mark>")),
        "{hits:?}"
    );
    let both = db
        .store
        .search_messages(ann, "quick fox", None, 10)
        .await
        .unwrap();
    assert_eq!(both.len(), 1, "every word must match");
    assert_eq!(
        both[0].message.body,
        "The quick brown fox jumps over the lazy dog"
    );
    assert_eq!(
        db.store
            .search_messages(bo, "quick", Some(theirs), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        db.store
            .search_messages(bo, "quick", Some(ours), 10)
            .await
            .unwrap()
            .is_empty(),
        "Bo is not a member of ours"
    );
    // Query syntax in the input is just text.
    for odd in [
        "\"",
        "AND OR NOT",
        "NEAR(quick fox",
        "*",
        "quick\" OR \"1",
        "",
    ] {
        db.store.search_messages(ann, odd, None, 10).await.unwrap();
    }
    db.store.delete_room(ours).await.unwrap();
    assert!(
        db.store
            .search_messages(ann, "quick", None, 10)
            .await
            .unwrap()
            .is_empty(),
        "gone with the room"
    );
}
both_backends!(search_finds_words_in_rooms_the_user_belongs_to);
