//! Users, sessions, refresh-token rotation, signing keys and the audit log, on both backends.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use unhidra_core::{Email, Role, UserId};
use unhidra_store::identity::{
    NewAuditEvent, NewRefreshToken, NewSession, NewUser, Rotation, SigningKeyRecord, TokenPurpose,
    UserChange,
};
use unhidra_store::testing::TestDb;
use unhidra_store::{StoreError, both_backends};
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    // Whole microseconds, as both backends store them.
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

async fn user(db: &TestDb, email: &str, name: Option<&str>) -> UserId {
    let id = UserId::new();
    db.store
        .create_user(&NewUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: name.map(str::to_owned),
            password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA".into(),
            role: Role::User,
            now: now(),
        })
        .await
        .unwrap();
    id
}

async fn migrated(db: &TestDb) {
    db.store.migrate().await.unwrap();
}

async fn users_are_unique_by_normalised_email(db: &TestDb) {
    migrated(db).await;
    let id = user(db, "Alice@Example.com", Some("Alice")).await;
    let found = db
        .store
        .user_by_email(&Email::parse("alice@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(found.id, id);
    assert_eq!(found.email.as_str(), "alice@example.com");
    assert_eq!(found.role, Role::User);
    assert!(found.active);
    assert_eq!(db.store.user_by_id(id).await.unwrap(), found);

    let again = db
        .store
        .create_user(&NewUser {
            id: UserId::new(),
            email: Email::parse("ALICE@example.COM").unwrap(),
            display_name: None,
            password_hash: "x".into(),
            role: Role::Admin,
            now: now(),
        })
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { entity: "user", .. })),
        "{again:?}"
    );
    assert!(matches!(
        db.store.user_by_id(UserId::new()).await,
        Err(StoreError::NotFound { entity: "user" })
    ));
    let page = db.store.list_users(None, 0, 10).await.unwrap();
    assert_eq!(page.total, 1, "the conflict stored nothing");
}
both_backends!(users_are_unique_by_normalised_email);

async fn users_are_searched_and_paged(db: &TestDb) {
    migrated(db).await;
    for i in 0..5 {
        user(
            db,
            &format!("user{i}@example.com"),
            Some(&format!("Person {i}")),
        )
        .await;
    }
    user(db, "odd_one%@example.org", Some("Zed")).await;
    let page = db.store.list_users(None, 2, 2).await.unwrap();
    assert_eq!((page.total, page.items.len()), (6, 2));
    assert_eq!(page.items[0].email.as_str(), "user2@example.com");
    let by_name = db.store.list_users(Some("person 3"), 0, 10).await.unwrap();
    assert_eq!(by_name.total, 1);
    assert_eq!(by_name.items[0].email.as_str(), "user3@example.com");
    let by_email = db
        .store
        .list_users(Some("EXAMPLE.ORG"), 0, 10)
        .await
        .unwrap();
    assert_eq!(by_email.total, 1);
    // `%` is a character, not a wildcard.
    let literal = db.store.list_users(Some("%"), 0, 10).await.unwrap();
    assert_eq!(literal.total, 1, "{:?}", literal.items);
}
both_backends!(users_are_searched_and_paged);

async fn admin_changes_apply(db: &TestDb) {
    migrated(db).await;
    let id = user(db, "bob@example.com", None).await;
    assert_eq!(db.store.count_active_users().await.unwrap(), 1);
    let changed = db
        .store
        .update_user(
            id,
            UserChange {
                role: Some(Role::Admin),
                active: None,
            },
            now(),
        )
        .await
        .unwrap();
    assert_eq!((changed.role, changed.active), (Role::Admin, true));
    let changed = db
        .store
        .update_user(
            id,
            UserChange {
                role: None,
                active: Some(false),
            },
            now(),
        )
        .await
        .unwrap();
    assert_eq!((changed.role, changed.active), (Role::Admin, false));
    assert_eq!(db.store.count_active_users().await.unwrap(), 0);
    assert!(matches!(
        db.store
            .update_user(UserId::new(), UserChange::default(), now())
            .await,
        Err(StoreError::NotFound { .. })
    ));
    db.store.set_password_hash(id, "$new", now()).await.unwrap();
    assert_eq!(db.store.user_by_id(id).await.unwrap().password_hash, "$new");
}
both_backends!(admin_changes_apply);

async fn concurrent_failures_are_all_counted(db: &TestDb) {
    migrated(db).await;
    let id = user(db, "carol@example.com", None).await;
    let until = now() + Duration::minutes(15);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = Arc::clone(&db.store);
            tokio::spawn(async move {
                store
                    .record_login_failure(id, 10, until, now())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.unwrap());
    }
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=20).collect::<Vec<_>>(),
        "each failure counted once"
    );
    let stored = db.store.user_by_id(id).await.unwrap();
    assert_eq!(stored.failed_logins, 20);
    assert_eq!(stored.locked_until, Some(until));
    db.store.record_login_success(id, now()).await.unwrap();
    let stored = db.store.user_by_id(id).await.unwrap();
    assert_eq!((stored.failed_logins, stored.locked_until), (0, None));
}
both_backends!(concurrent_failures_are_all_counted);

fn token(hash: &str, lifetime: Duration) -> NewRefreshToken {
    NewRefreshToken {
        hash: hash.to_owned(),
        expires_at: now() + lifetime,
    }
}

async fn session(db: &TestDb, owner: UserId, first: &str) -> Uuid {
    let id = Uuid::new_v4();
    db.store
        .create_session(
            &NewSession {
                id,
                user_id: owner,
                user_agent: Some("test-agent".into()),
                ip: Some("127.0.0.1".into()),
                now: now(),
                expires_at: now() + Duration::days(30),
                mfa: false,
            },
            &token(first, Duration::days(14)),
        )
        .await
        .unwrap();
    id
}

async fn refresh_tokens_rotate_once(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "dave@example.com", None).await;
    let sid = session(db, owner, "t1").await;
    let rotated = db
        .store
        .rotate_refresh_token("t1", &token("t2", Duration::days(14)), now())
        .await
        .unwrap();
    assert!(
        matches!(&rotated, Rotation::Rotated(s) if s.id == sid),
        "{rotated:?}"
    );
    // The old token again: reuse, naming the session so the caller can revoke it.
    let reused = db
        .store
        .rotate_refresh_token("t1", &token("t3", Duration::days(14)), now())
        .await
        .unwrap();
    assert!(
        matches!(&reused, Rotation::Reused { session, .. } if session.id == sid),
        "{reused:?}"
    );
    // Reuse stored nothing: t3 does not exist.
    let t3 = db
        .store
        .rotate_refresh_token("t3", &token("t4", Duration::days(14)), now())
        .await
        .unwrap();
    assert_eq!(t3, Rotation::Invalid);
    assert!(db.store.refresh_token_usable("t2", now()).await.unwrap());
    assert!(
        !db.store.refresh_token_usable("t1", now()).await.unwrap(),
        "used"
    );
    assert!(!db.store.refresh_token_usable("nope", now()).await.unwrap());
    // The successor still works.
    let next = db
        .store
        .rotate_refresh_token("t2", &token("t5", Duration::days(14)), now())
        .await
        .unwrap();
    assert!(matches!(next, Rotation::Rotated(_)));
    assert_eq!(
        db.store
            .rotate_refresh_token("unknown", &token("x", Duration::days(1)), now())
            .await
            .unwrap(),
        Rotation::Invalid
    );
}
both_backends!(refresh_tokens_rotate_once);

async fn sessions_keep_their_factor_and_last_password(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "fay@example.com", None).await;
    let sid = session(db, owner, "f1").await;
    let (opened, _) = db.store.session_with_user(sid).await.unwrap();
    assert!(!opened.mfa, "opened with a password only");
    assert_eq!(opened.authenticated_at, opened.created_at);

    let later = opened.created_at + Duration::minutes(7);
    assert!(db.store.reauthenticate_session(sid, later).await.unwrap());
    assert!(db.store.mark_session_mfa(sid, later).await.unwrap());
    let (again, _) = db.store.session_with_user(sid).await.unwrap();
    assert_eq!(again.authenticated_at, later);
    assert!(again.mfa);
    assert_eq!(again.created_at, opened.created_at);
    // A rotation carries both along.
    let rotated = db
        .store
        .rotate_refresh_token("f1", &token("f2", Duration::days(14)), later)
        .await
        .unwrap();
    assert!(
        matches!(&rotated, Rotation::Rotated(s) if s.mfa && s.authenticated_at == later),
        "{rotated:?}"
    );

    // A revoked session is neither re-authenticated nor marked.
    let other = session(db, owner, "g1").await;
    db.store.revoke_session(other, "test", now()).await.unwrap();
    assert!(!db.store.reauthenticate_session(other, later).await.unwrap());
    assert!(!db.store.mark_session_mfa(other, later).await.unwrap());
    let (revoked, _) = db.store.session_with_user(other).await.unwrap();
    assert!(!revoked.mfa);
    assert_eq!(revoked.authenticated_at, revoked.created_at);
}
both_backends!(sessions_keep_their_factor_and_last_password);

/// The migration that gave sessions their factor and last password, applied to sessions that
/// already exist: each counts as authenticated when it began, and as verified with a second
/// factor only if it began after its user enabled TOTP.
async fn existing_sessions_get_their_factor_from_their_start(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "gus@example.com", None).await;
    let before = session(db, owner, "b1").await;
    db.store.set_pending_totp(owner, "SECRET").await.unwrap();
    assert!(
        db.store
            .enable_totp(owner, 1, &["c".to_owned()], now())
            .await
            .unwrap()
    );
    let after = session(db, owner, "a1").await;
    let plain = user(db, "hal@example.com", None).await;
    let other = session(db, plain, "p1").await;
    // Back to the schema before the migration, with these sessions in it; then migrate.
    db.execute_raw(
        "ALTER TABLE sessions DROP COLUMN mfa; \
         ALTER TABLE sessions DROP COLUMN authenticated_at; \
         DELETE FROM _sqlx_migrations WHERE version = 7;",
    )
    .await;
    migrated(db).await;
    for (id, mfa) in [(before, false), (after, true), (other, false)] {
        let (found, _) = db.store.session_with_user(id).await.unwrap();
        assert_eq!(found.mfa, mfa, "{id}");
        assert_eq!(found.authenticated_at, found.created_at);
    }
}
both_backends!(existing_sessions_get_their_factor_from_their_start);

async fn concurrent_rotations_have_one_winner(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "erin@example.com", None).await;
    session(db, owner, "race").await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&db.store);
            tokio::spawn(async move {
                store
                    .rotate_refresh_token(
                        "race",
                        &token(&format!("next-{i}"), Duration::days(1)),
                        now(),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut rotated = 0;
    for t in tasks {
        match t.await.unwrap() {
            Rotation::Rotated(_) => rotated += 1,
            Rotation::Reused { .. } => {}
            Rotation::Invalid => panic!("a known token is never invalid here"),
        }
    }
    assert_eq!(rotated, 1);
}
both_backends!(concurrent_rotations_have_one_winner);

async fn expired_and_revoked_tokens_do_not_rotate(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "frank@example.com", None).await;
    let sid = session(db, owner, "old").await;
    let later = now() + Duration::days(15);
    assert_eq!(
        db.store
            .rotate_refresh_token("old", &token("n", Duration::days(1)), later)
            .await
            .unwrap(),
        Rotation::Invalid,
        "past its 14 days"
    );
    let sid2 = session(db, owner, "live").await;
    assert!(
        db.store
            .revoke_session(sid2, "logout", now())
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .revoke_session(sid2, "logout", now())
            .await
            .unwrap(),
        "once"
    );
    assert_eq!(
        db.store
            .rotate_refresh_token("live", &token("n2", Duration::days(1)), now())
            .await
            .unwrap(),
        Rotation::Invalid
    );
    let live = db.store.live_sessions(owner, now()).await.unwrap();
    assert_eq!(live.iter().map(|s| s.id).collect::<Vec<_>>(), vec![sid]);
    let (found, found_user) = db.store.session_with_user(sid2).await.unwrap();
    assert!(!found.is_live(now()));
    assert_eq!(found_user.id, owner);
}
both_backends!(expired_and_revoked_tokens_do_not_rotate);

async fn all_other_sessions_can_be_revoked(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "gina@example.com", None).await;
    let keep = session(db, owner, "a").await;
    session(db, owner, "b").await;
    session(db, owner, "c").await;
    let n = db
        .store
        .revoke_user_sessions(owner, Some(keep), "password changed", now())
        .await
        .unwrap();
    assert_eq!(n, 2);
    let live = db.store.live_sessions(owner, now()).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, keep);
    assert_eq!(
        db.store
            .revoke_user_sessions(owner, None, "deactivated", now())
            .await
            .unwrap(),
        1
    );
}
both_backends!(all_other_sessions_can_be_revoked);

async fn signing_keys_are_kept_and_retired(db: &TestDb) {
    migrated(db).await;
    let key = |kid: &str, at: DateTime<Utc>| SigningKeyRecord {
        kid: kid.to_owned(),
        algorithm: "EdDSA".into(),
        public_key: vec![1; 32],
        private_key: Some(vec![2; 48]),
        created_at: at,
        retired_at: None,
    };
    let t0 = now();
    db.store.insert_signing_key(&key("k1", t0)).await.unwrap();
    db.store
        .insert_signing_key(&key("k2", t0 + Duration::seconds(1)))
        .await
        .unwrap();
    assert!(matches!(
        db.store.insert_signing_key(&key("k1", t0)).await,
        Err(StoreError::Conflict { .. })
    ));
    db.store.retire_signing_key("k1", t0).await.unwrap();
    let keys = db.store.signing_keys().await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
        ["k1", "k2"]
    );
    assert_eq!(keys[0].retired_at, Some(t0));
    assert_eq!(keys[1], key("k2", t0 + Duration::seconds(1)));
    assert!(matches!(
        db.store.retire_signing_key("nope", t0).await,
        Err(StoreError::NotFound { .. })
    ));
}
both_backends!(signing_keys_are_kept_and_retired);

async fn audit_events_page_newest_first(db: &TestDb) {
    migrated(db).await;
    let actor = user(db, "hal@example.com", None).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            db.store
                .append_audit(&NewAuditEvent {
                    at: now(),
                    kind: format!("test.{i}"),
                    actor_id: Some(actor),
                    subject_id: Some("s".into()),
                    ip: Some("127.0.0.1".into()),
                    trace_id: Some("t".into()),
                    detail: format!(r#"{{"n":{i}}}"#),
                })
                .await
                .unwrap(),
        );
    }
    let newest = db.store.audit_events(None, 2).await.unwrap();
    assert_eq!(
        newest.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["test.4", "test.3"]
    );
    assert_eq!(newest[0].actor_id, Some(actor));
    let detail: serde_json::Value = serde_json::from_str(&newest[0].detail).unwrap();
    assert_eq!(detail["n"], 4);
    let older = db.store.audit_events(Some(newest[1].id), 10).await.unwrap();
    assert_eq!(older.len(), 3);
    assert_eq!(older[0].kind, "test.2");
}
both_backends!(audit_events_page_newest_first);

/// Tokens issued for one user at the same time leave exactly one usable: each issue sees the
/// ones before it.
async fn concurrent_one_time_tokens_leave_one_usable(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "race@example.com", None).await;
    let purpose = TokenPurpose::ResetPassword;
    let later = now() + Duration::minutes(30);
    let issues = (0..8).map(|i| {
        let store = db.store.clone();
        tokio::spawn(async move {
            store
                .issue_one_time_token(&format!("race{i}"), owner, purpose, now(), later)
                .await
        })
    });
    for issue in issues.collect::<Vec<_>>() {
        issue.await.unwrap().unwrap();
    }
    let mut usable = 0;
    for i in 0..8 {
        if db
            .store
            .peek_one_time_token(&format!("race{i}"), purpose, now())
            .await
            .is_ok()
        {
            usable += 1;
        }
    }
    assert_eq!(usable, 1, "exactly the last one issued stays usable");
}
both_backends!(concurrent_one_time_tokens_leave_one_usable);

async fn one_time_tokens_work_once_and_only_the_newest(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "ivy@example.com", None).await;
    let purpose = TokenPurpose::ResetPassword;
    let later = now() + Duration::minutes(30);
    db.store
        .issue_one_time_token("h1", owner, purpose, now(), later)
        .await
        .unwrap();
    db.store
        .issue_one_time_token("h2", owner, purpose, now(), later)
        .await
        .unwrap();
    // Only the newest mail's token works, once, and only for its purpose.
    assert!(matches!(
        db.store.consume_one_time_token("h1", purpose, now()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        db.store
            .consume_one_time_token("h2", TokenPurpose::VerifyEmail, now())
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        db.store
            .peek_one_time_token("h2", purpose, now())
            .await
            .unwrap(),
        owner,
        "peeking does not use it"
    );
    assert_eq!(
        db.store
            .consume_one_time_token("h2", purpose, now())
            .await
            .unwrap(),
        owner
    );
    assert!(
        db.store
            .consume_one_time_token("h2", purpose, now())
            .await
            .is_err()
    );
    // Expired tokens do not work.
    db.store
        .issue_one_time_token("h3", owner, purpose, now(), now() + Duration::minutes(1))
        .await
        .unwrap();
    assert!(
        db.store
            .consume_one_time_token("h3", purpose, now() + Duration::minutes(2))
            .await
            .is_err()
    );

    db.store.set_email_verified(owner, now()).await.unwrap();
    let first = db.store.user_by_id(owner).await.unwrap().email_verified_at;
    assert!(first.is_some());
    db.store
        .set_email_verified(owner, now() + Duration::days(1))
        .await
        .unwrap();
    assert_eq!(
        db.store.user_by_id(owner).await.unwrap().email_verified_at,
        first,
        "first time only"
    );
}
both_backends!(one_time_tokens_work_once_and_only_the_newest);

async fn devices_are_known_by_agent_and_address(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "jon@example.com", None).await;
    let seen = |ua: Option<&'static str>, ip: Option<&'static str>| {
        let store = Arc::clone(&db.store);
        async move {
            let h = store.known_device(owner, ua, ip).await.unwrap();
            (h.any_session, h.this_device)
        }
    };
    assert_eq!(
        seen(Some("test-agent"), Some("127.0.0.1")).await,
        (false, false)
    );
    session(db, owner, "t").await;
    assert_eq!(
        seen(Some("test-agent"), Some("127.0.0.1")).await,
        (true, true)
    );
    assert_eq!(
        seen(Some("other-agent"), Some("127.0.0.1")).await,
        (true, false)
    );
    assert_eq!(
        seen(Some("test-agent"), Some("10.0.0.1")).await,
        (true, false)
    );
    assert_eq!(seen(None, None).await, (true, false));
}
both_backends!(devices_are_known_by_agent_and_address);

async fn totp_factors_and_challenges(db: &TestDb) {
    migrated(db).await;
    let owner = user(db, "kay@example.com", None).await;
    assert_eq!(db.store.totp_factor(owner).await.unwrap(), None);
    assert!(db.store.set_pending_totp(owner, "SECRETONE").await.unwrap());
    let pending = db.store.totp_factor(owner).await.unwrap().unwrap();
    assert!(!pending.enabled);
    assert!(
        !format!("{pending:?}").contains("SECRETONE"),
        "the secret never prints"
    );
    // A pending secret takes no codes.
    assert!(!db.store.claim_totp_step(owner, 5).await.unwrap());
    let codes = vec!["c1".to_owned(), "c2".to_owned()];
    assert!(
        db.store
            .enable_totp(owner, 100, &codes, now())
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .enable_totp(owner, 100, &codes, now())
            .await
            .unwrap(),
        "once"
    );
    assert!(
        !db.store.set_pending_totp(owner, "OTHER").await.unwrap(),
        "enabled stays"
    );
    assert!(
        db.store
            .user_by_id(owner)
            .await
            .unwrap()
            .totp_enabled_at
            .is_some()
    );

    // Each step is good once, and never an earlier one.
    assert!(!db.store.claim_totp_step(owner, 100).await.unwrap());
    assert!(db.store.claim_totp_step(owner, 101).await.unwrap());
    assert!(!db.store.claim_totp_step(owner, 101).await.unwrap());
    assert!(!db.store.claim_totp_step(owner, 99).await.unwrap());

    assert_eq!(db.store.recovery_codes_left(owner).await.unwrap(), 2);
    assert!(
        db.store
            .use_recovery_code(owner, "c1", now())
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .use_recovery_code(owner, "c1", now())
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .use_recovery_code(owner, "nope", now())
            .await
            .unwrap()
    );
    assert_eq!(db.store.recovery_codes_left(owner).await.unwrap(), 1);

    let later = now() + Duration::minutes(5);
    db.store
        .create_mfa_challenge("ch", owner, later)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            db.store
                .attempt_mfa_challenge("ch", 3, now())
                .await
                .unwrap(),
            owner
        );
    }
    assert!(
        matches!(
            db.store.attempt_mfa_challenge("ch", 3, now()).await,
            Err(StoreError::NotFound { .. })
        ),
        "out of attempts"
    );
    db.store
        .create_mfa_challenge("ch2", owner, later)
        .await
        .unwrap();
    db.store.close_mfa_challenge("ch2", now()).await.unwrap();
    assert!(
        db.store
            .attempt_mfa_challenge("ch2", 3, now())
            .await
            .is_err(),
        "closed"
    );
    db.store
        .create_mfa_challenge("ch3", owner, later)
        .await
        .unwrap();
    assert!(
        db.store
            .attempt_mfa_challenge("ch3", 3, later)
            .await
            .is_err(),
        "expired"
    );

    db.store.disable_totp(owner, now()).await.unwrap();
    assert_eq!(db.store.totp_factor(owner).await.unwrap(), None);
    assert_eq!(db.store.recovery_codes_left(owner).await.unwrap(), 0);
    assert!(
        db.store
            .user_by_id(owner)
            .await
            .unwrap()
            .totp_enabled_at
            .is_none()
    );
}
both_backends!(totp_factors_and_challenges);
