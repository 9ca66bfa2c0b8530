//! Files' records on both backends: a quota holds in the transaction that adds a file, a
//! deletion gives its bytes back once, listings page by a cursor, quotas are set and removed.

use chrono::{DateTime, Utc};
use unhidra_store::both_backends;
use unhidra_store::files::{FileQuota, FileRecord, FileUsage};
use unhidra_store::testing::TestDb;
use uuid::Uuid;

use crate::devices::user;

fn at(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + n, 0).unwrap()
}

fn file(owner: unhidra_core::UserId, size: i64, n: i64) -> FileRecord {
    let id = Uuid::new_v4();
    FileRecord {
        id,
        owner: Some(owner),
        state: "ready".into(),
        access: "private".into(),
        name: format!("f{n}.txt"),
        content_type: "text/plain".into(),
        size,
        sha256: "ab".repeat(32),
        storage_key: format!("k/{}", id.simple()),
        created_at: at(n),
        expires_at: None,
        deleted_at: None,
    }
}

async fn quotas_hold_deletions_give_back_and_listings_page(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let alice = user(db, "alice@example.com").await;
    let bob = user(db, "bob@example.com").await;
    let quota = FileQuota {
        max_bytes: Some(100),
        max_files: Some(3),
    };
    let a1 = file(alice, 60, 1);
    assert!(db.store.create_file(&a1, &quota).await.unwrap());
    // Past the bytes: nothing stored, nothing counted.
    let over = file(alice, 41, 2);
    assert!(!db.store.create_file(&over, &quota).await.unwrap());
    assert!(db.store.file(over.id).await.is_err());
    let a2 = file(alice, 40, 3);
    assert!(db.store.create_file(&a2, &quota).await.unwrap());
    assert_eq!(
        db.store.file_usage(alice).await.unwrap(),
        FileUsage {
            bytes: 100,
            files: 2
        }
    );
    // Bob's usage is his own; a file past the quota alone is refused at once.
    assert!(
        !db.store
            .create_file(&file(bob, 101, 4), &quota)
            .await
            .unwrap()
    );
    let b1 = file(bob, 10, 5);
    assert!(db.store.create_file(&b1, &quota).await.unwrap());
    // The count holds too.
    let few = FileQuota {
        max_bytes: None,
        max_files: Some(2),
    };
    assert!(
        !db.store
            .create_file(&file(alice, 0, 6), &few)
            .await
            .unwrap()
    );

    // Newest first, a page at a time.
    let first = db.store.list_files(alice, None, 1).await.unwrap();
    assert_eq!(first.iter().map(|f| f.id).collect::<Vec<_>>(), [a2.id]);
    let next = db
        .store
        .list_files(alice, Some((first[0].created_at, first[0].id)), 10)
        .await
        .unwrap();
    assert_eq!(next.iter().map(|f| f.id).collect::<Vec<_>>(), [a1.id]);
    assert_eq!(db.store.file(a1.id).await.unwrap(), a1);

    // Access changes; a deletion gives the bytes back once, and leaves a tombstone.
    assert!(db.store.set_file_access(a1.id, "public").await.unwrap());
    assert_eq!(db.store.file(a1.id).await.unwrap().access, "public");
    let gone = db.store.delete_file(a1.id, at(100)).await.unwrap().unwrap();
    assert_eq!((gone.id, gone.access.as_str()), (a1.id, "public"));
    assert!(
        db.store
            .delete_file(a1.id, at(101))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        db.store.file_usage(alice).await.unwrap(),
        FileUsage {
            bytes: 40,
            files: 1
        }
    );
    let tomb = db.store.file(a1.id).await.unwrap();
    assert_eq!(
        (tomb.state.as_str(), tomb.deleted_at),
        ("deleted", Some(at(100)))
    );
    assert!(!db.store.set_file_access(a1.id, "private").await.unwrap());
    assert_eq!(db.store.list_files(alice, None, 10).await.unwrap().len(), 1);
    assert!(
        db.store
            .create_file(&file(alice, 60, 7), &quota)
            .await
            .unwrap()
    );

    // An admin's quota for one user, and its removal.
    assert_eq!(db.store.file_quota(alice).await.unwrap(), None);
    let own = FileQuota {
        max_bytes: Some(1 << 30),
        max_files: None,
    };
    db.store.set_file_quota(alice, Some(&own)).await.unwrap();
    db.store.set_file_quota(alice, Some(&own)).await.unwrap();
    assert_eq!(db.store.file_quota(alice).await.unwrap(), Some(own));
    db.store.set_file_quota(alice, None).await.unwrap();
    assert_eq!(db.store.file_quota(alice).await.unwrap(), None);
}
both_backends!(quotas_hold_deletions_give_back_and_listings_page);
