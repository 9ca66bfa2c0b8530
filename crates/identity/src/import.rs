//! Importing users from another system, with their password hashes, as JSON lines. Legacy
//! SHA-256 hashes are kept until each user's next login rewrites them as Argon2id, so nobody is
//! forced to reset a password.

use std::collections::HashSet;

use argon2::password_hash::PasswordHash;
use serde::Deserialize;
use unhidra_core::{Email, Role, UserId};
use unhidra_store::StoreError;
use unhidra_store::identity::{NewUser, UserChange};

use super::hasher::{HashParams, LegacyHash};
use super::{Identity, RequestContext};

/// One line of an import file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    email: String,
    display_name: Option<String>,
    role: Option<String>,
    active: Option<bool>,
    email_verified: Option<bool>,
    /// An Argon2 PHC string, taken as it is.
    password_hash: Option<String>,
    /// A SHA-256 digest, hex.
    sha256: Option<String>,
    /// The salt of `sha256`, as text.
    salt: Option<String>,
    /// `prefix` (SHA-256(salt ‖ password), the default) or `suffix`.
    salt_position: Option<String>,
}

/// A checked line, ready to store.
struct Checked {
    email: Email,
    display_name: Option<String>,
    role: Role,
    active: bool,
    email_verified: bool,
    hash: String,
    /// The Argon2 hash costs more than new hashes.
    costlier: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    /// Users created.
    pub imported: usize,
    /// Emails that had an account already, left as they were.
    pub skipped: Vec<String>,
    /// Imported emails whose Argon2 hash costs more than new hashes: until the user's next
    /// login upgrades it, a wrong password for them is answered measurably later than for an
    /// unknown email (cheaper hashes are padded; costlier ones cannot be).
    pub costlier: Vec<String>,
}

/// Why nothing was imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Lines that cannot be imported, each as `line N: why`.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks one line; an Argon2 hash must cost at most `ceiling`, and is marked when it costs
/// more than `current`.
fn check(line: ImportLine, current: HashParams, ceiling: HashParams) -> Result<Checked, String> {
    let mut costlier = false;
    let email = Email::parse(&line.email).map_err(|e| format!("email: {e}"))?;
    let role = match line.role.as_deref() {
        None => Role::User,
        Some(text) => text.parse().map_err(|e: String| format!("role: {e}"))?,
    };
    let hash = match (line.password_hash, line.sha256) {
        (Some(phc), None) => {
            let parsed = PasswordHash::new(&phc).map_err(|e| format!("password_hash: {e}"))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(format!(
                    "password_hash: {} is not supported; give argon2 PHC strings or sha256",
                    parsed.algorithm
                ));
            }
            let cost = HashParams::of_hash(&parsed).map_err(|e| format!("password_hash: {e}"))?;
            if let Some(why) = cost.exceeds(ceiling) {
                return Err(format!(
                    "password_hash: its Argon2 {why}; every login would cost that much, so \
                     it is refused (raise the ceiling, or import without this hash and let \
                     the user reset the password)"
                ));
            }
            costlier = cost.costs_more_than(current);
            phc
        }
        (None, Some(digest)) => {
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("sha256: expected 64 hex digits".into());
            }
            let salt_first = match line.salt_position.as_deref() {
                None | Some("prefix") => true,
                Some("suffix") => false,
                Some(other) => {
                    return Err(format!("salt_position: {other:?} is not prefix or suffix"));
                }
            };
            let salt = line.salt.unwrap_or_default();
            LegacyHash::encode(&digest, salt.as_bytes(), salt_first)
        }
        (Some(_), Some(_)) => return Err("give password_hash or sha256, not both".into()),
        (None, None) => return Err("a password_hash or a sha256 is required".into()),
    };
    let display_name = line
        .display_name
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    if let Some(name) = &display_name {
        if name.chars().count() > crate::MAX_DISPLAY_NAME {
            return Err(format!(
                "display_name: use at most {} characters",
                crate::MAX_DISPLAY_NAME
            ));
        }
        if unhidra_core::forbidden_control(name, unhidra_core::Controls::None).is_some() {
            return Err("display_name: no control characters or bidirectional overrides".into());
        }
    }
    Ok(Checked {
        email,
        display_name,
        role,
        active: line.active.unwrap_or(true),
        email_verified: line.email_verified.unwrap_or(false),
        hash,
        costlier,
    })
}

impl Identity {
    /// Imports users from JSON lines. Every line is checked first: if any is wrong, nothing is
    /// imported and every problem is reported with its line number. Existing emails are skipped.
    pub async fn import_users(
        &self,
        text: &str,
        ctx: &RequestContext,
    ) -> Result<ImportSummary, ImportError> {
        let mut problems = Vec::new();
        let mut checked = Vec::new();
        let mut seen = HashSet::new();
        let ceiling = self.hasher.ceiling();
        let current = self.hasher.params();
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<ImportLine>(raw)
                .map_err(|e| e.to_string())
                .and_then(|line| check(line, current, ceiling));
            match parsed {
                Ok(user) if !seen.insert(user.email.clone()) => {
                    problems.push(format!("line {number}: {} appears twice", user.email));
                }
                Ok(user) => checked.push(user),
                Err(why) => problems.push(format!("line {number}: {why}")),
            }
        }
        if !problems.is_empty() {
            return Err(ImportError::Invalid(problems));
        }
        let mut summary = ImportSummary::default();
        let now = self.now();
        for user in checked {
            let id = UserId::new();
            let created = self
                .store
                .create_user(&NewUser {
                    id,
                    email: user.email.clone(),
                    display_name: user.display_name,
                    password_hash: user.hash,
                    role: user.role,
                    now,
                })
                .await;
            match created {
                Ok(()) if user.costlier => {
                    summary.imported += 1;
                    summary.costlier.push(user.email.to_string());
                }
                Ok(()) => summary.imported += 1,
                Err(StoreError::Conflict { .. }) => {
                    summary.skipped.push(user.email.to_string());
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if !user.active {
                let change = UserChange {
                    role: None,
                    active: Some(false),
                };
                self.store.update_user(id, change, now).await?;
            }
            if user.email_verified {
                self.store.set_email_verified(id, now).await?;
            }
        }
        self.audit(
            "users.imported",
            None,
            None,
            ctx,
            serde_json::json!({
                "imported": summary.imported,
                "skipped": summary.skipped.len(),
                "costlier": summary.costlier.len(),
            }),
        )
        .await;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hasher::DEFAULT_CEILING;

    fn line(hash: &str) -> ImportLine {
        serde_json::from_value(serde_json::json!({
            "email": "ada@example.com",
            "password_hash": hash,
        }))
        .unwrap()
    }

    /// The production cost of new hashes.
    const PROD: HashParams = HashParams {
        memory_kib: 19_456,
        iterations: 2,
        parallelism: 1,
    };

    const SALT_AND_HASH: &str =
        "c29tZXNhbHRzb21lc2FsdA$Dt2hHYzQ2SjFHUJ9cyAk6jPgwzXHGJjm0eNm2sX1RGU";

    #[test]
    fn hashes_above_the_cost_ceiling_are_refused() {
        let costly = format!("$argon2id$v=19$m=4194304,t=2,p=1${SALT_AND_HASH}");
        let why = check(line(&costly), PROD, DEFAULT_CEILING).err().unwrap();
        assert!(
            why.starts_with("password_hash: its Argon2 memory (KiB) 4194304 is above argon2_max_memory_kib = 262144"),
            "{why}"
        );
        for (params, key) in [
            ("m=19456,t=11,p=1", "argon2_max_iterations"),
            ("m=19456,t=2,p=9", "argon2_max_parallelism"),
        ] {
            let hash = format!("$argon2id$v=19${params}${SALT_AND_HASH}");
            let why = check(line(&hash), PROD, DEFAULT_CEILING).err().unwrap();
            assert!(why.contains(key), "{why}");
        }
        let fine = format!("$argon2id$v=19$m=262144,t=10,p=8${SALT_AND_HASH}");
        assert!(check(line(&fine), PROD, DEFAULT_CEILING).is_ok());
    }

    #[test]
    fn hashes_costlier_than_new_ones_are_marked() {
        let costlier = |params: &str| {
            let hash = format!("$argon2id$v=19${params}${SALT_AND_HASH}");
            check(line(&hash), PROD, DEFAULT_CEILING).unwrap().costlier
        };
        assert!(costlier("m=65536,t=3,p=4"));
        assert!(costlier("m=19456,t=3,p=1"));
        assert!(!costlier("m=19456,t=2,p=1"), "the current cost");
        assert!(!costlier("m=4096,t=3,p=1"), "cheaper ones are padded");
        assert!(!costlier("m=19456,t=2,p=4"), "more lanes are not more work");
        assert!(
            costlier("m=32768,t=1,p=1"),
            "less work, but more memory than a hashing thread holds"
        );
    }

    #[test]
    fn display_names_are_checked_like_at_registration() {
        let with_name = |name: &str| -> ImportLine {
            serde_json::from_value(serde_json::json!({
                "email": "ada@example.com",
                "sha256": "0".repeat(64),
                "display_name": name,
            }))
            .unwrap()
        };
        let why = check(with_name("Ada\u{0}"), PROD, DEFAULT_CEILING)
            .err()
            .unwrap();
        assert!(why.starts_with("display_name: no control"), "{why}");
        let why = check(with_name(&"a".repeat(101)), PROD, DEFAULT_CEILING)
            .err()
            .unwrap();
        assert!(why.starts_with("display_name: use at most 100"), "{why}");
        let ok = check(with_name("  Ada Lovelace "), PROD, DEFAULT_CEILING).unwrap();
        assert_eq!(ok.display_name.as_deref(), Some("Ada Lovelace"));
    }
}
