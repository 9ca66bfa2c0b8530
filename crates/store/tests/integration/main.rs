//! The store's behaviour, run against SQLite and PostgreSQL alike.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a test reports failure"
)]

use std::sync::Arc;

use chrono::Utc;
use unhidra_store::testing::TestDb;
use unhidra_store::{Backend, INSTANCE_ID, StoreError, StoreOptions, both_backends};

async fn migrations_build_the_schema_from_empty(db: &TestDb) {
    let before = db.store.health().await.unwrap();
    assert_eq!(before.applied_migrations, 0);
    assert!(!before.is_migrated());
    // A query against a table of a later migration fails until migrated.
    assert!(db.store.meta_get(INSTANCE_ID).await.is_err());

    db.store.migrate().await.unwrap();
    let after = db.store.health().await.unwrap();
    assert!(after.is_migrated(), "{after:?}");
    assert!(after.known_migrations >= 1);

    // Running it again changes nothing.
    db.store.migrate().await.unwrap();
    assert_eq!(db.store.health().await.unwrap(), after);
}
both_backends!(migrations_build_the_schema_from_empty);

async fn meta_keys_are_written_once(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let store = &db.store;
    assert!(matches!(
        store.meta_get("missing").await,
        Err(StoreError::NotFound { entity: "meta" })
    ));
    store.meta_insert("k", "first", Utc::now()).await.unwrap();
    let again = store.meta_insert("k", "second", Utc::now()).await;
    assert!(
        matches!(again, Err(StoreError::Conflict { entity: "meta", .. })),
        "{again:?}"
    );
    assert_eq!(
        store.meta_get("k").await.unwrap(),
        "first",
        "a conflict changes nothing"
    );
}
both_backends!(meta_keys_are_written_once);

async fn concurrent_first_writers_agree(db: &TestDb) {
    db.store.migrate().await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&db.store);
            tokio::spawn(async move {
                store
                    .meta_get_or_insert(INSTANCE_ID, &format!("candidate-{i}"), Utc::now())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    seen.dedup();
    assert_eq!(
        seen.len(),
        1,
        "every caller sees the one value that won: {seen:?}"
    );
    assert_eq!(db.store.meta_get(INSTANCE_ID).await.unwrap(), seen[0]);
}
both_backends!(concurrent_first_writers_agree);

async fn backup_is_a_usable_copy_or_a_clear_refusal(db: &TestDb) {
    db.store.migrate().await.unwrap();
    db.store.meta_insert("k", "v", Utc::now()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("copy.db");
    match db.store.backend() {
        Backend::Sqlite => {
            db.store.backup(&target).await.unwrap();
            let copy = unhidra_store::connect(
                &format!("sqlite:{}", target.display()),
                &StoreOptions::default(),
            )
            .await
            .unwrap();
            assert!(copy.health().await.unwrap().is_migrated());
            assert_eq!(copy.meta_get("k").await.unwrap(), "v");
            copy.close().await;
            // A second backup to the same path never overwrites it.
            assert!(matches!(
                db.store.backup(&target).await,
                Err(StoreError::Invalid(_))
            ));
        }
        Backend::Postgres => {
            let err = db.store.backup(&target).await.unwrap_err();
            assert!(matches!(err, StoreError::Unsupported(_)));
            assert!(err.to_string().contains("pg_dump"));
            assert!(!target.exists());
        }
    }
}
both_backends!(backup_is_a_usable_copy_or_a_clear_refusal);

async fn the_url_reopens_the_same_database(db: &TestDb) {
    db.store.migrate().await.unwrap();
    db.store.meta_insert("k", "v", Utc::now()).await.unwrap();
    let other = unhidra_store::connect(&db.url, &StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(other.backend(), db.store.backend());
    assert_eq!(other.meta_get("k").await.unwrap(), "v");
    other.close().await;
}
both_backends!(the_url_reopens_the_same_database);

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let options = StoreOptions {
        acquire_timeout: std::time::Duration::from_secs(2),
        ..StoreOptions::default()
    };
    // Port 1 on loopback refuses at once.
    let err = unhidra_store::connect("postgres://postgres@127.0.0.1:1/test", &options)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn an_unknown_url_is_refused() {
    let err = unhidra_store::connect("mysql://x", &StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
}

mod cron;

mod deployments;

mod devices;

mod files;

mod identity;

mod jobs;

mod rooms;
