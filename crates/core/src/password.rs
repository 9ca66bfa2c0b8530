//! The password policy (NIST SP 800-63B): length, a list of common and breached passwords, no
//! part of the account's email, and a strength estimate — and no composition rules, no
//! truncation, no case folding of what is stored.

use serde::{Deserialize, Serialize};

use crate::email::Email;

/// 197,549 common and breached passwords, lower-cased and sorted bytewise (see `data/README.md`).
static COMMON: &str = include_str!("../data/common-passwords.txt");

/// The shortest minimum length the policy accepts: shorter would defeat the common list,
/// which holds passwords of 8 characters or more.
pub const LOWEST_MIN_LENGTH: usize = 8;
/// Strength is estimated on at most this many characters; longer passwords are strong by length.
const STRENGTH_PREFIX: usize = 100;

/// What a new password must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordPolicy {
    /// Fewest characters (Unicode code points); 15 is NIST's figure for a password used alone.
    pub min_length: usize,
    /// Most characters; at least 64 must be allowed.
    pub max_length: usize,
    /// Lowest zxcvbn score (0–4) accepted.
    pub min_strength: u8,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_length: 15,
            max_length: 256,
            min_strength: 3,
        }
    }
}

/// One rule a password broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A stable code: `too_short`, `too_long`, `common_password`, `contains_email`, `too_weak`.
    pub code: &'static str,
    /// The rule in words.
    pub message: String,
}

impl PasswordPolicy {
    /// Every rule `password` breaks for the account `email`; empty when it is acceptable.
    /// `hints` are other words tied to the account (a display name) that count against strength.
    pub fn check(&self, password: &str, email: Option<&Email>, hints: &[&str]) -> Vec<Violation> {
        let mut broken = Vec::new();
        let length = password.chars().count();
        if length < self.min_length {
            broken.push(Violation {
                code: "too_short",
                message: format!("use at least {} characters", self.min_length),
            });
        }
        if length > self.max_length {
            broken.push(Violation {
                code: "too_long",
                message: format!("use at most {} characters", self.max_length),
            });
        }
        if is_common(password) {
            broken.push(Violation {
                code: "common_password",
                message: "this password is on a list of common or breached passwords".into(),
            });
        }
        let lower = password.to_lowercase();
        if let Some(email) = email {
            let local = email.local_part();
            if local.len() >= 3 && lower.contains(local) {
                broken.push(Violation {
                    code: "contains_email",
                    message: "the password must not contain your email address".into(),
                });
            }
        }
        if length <= self.max_length && strength(password, email, hints) < self.min_strength {
            broken.push(Violation {
                code: "too_weak",
                message: "this password is easy to guess; a few unrelated words make a strong one"
                    .into(),
            });
        }
        broken
    }
}

/// The zxcvbn score (0–4) of the password's first characters, with the account's own words
/// counted as guessable.
fn strength(password: &str, email: Option<&Email>, hints: &[&str]) -> u8 {
    if password.is_empty() {
        return 0;
    }
    let prefix: String = password.chars().take(STRENGTH_PREFIX).collect();
    let mut inputs: Vec<&str> = hints.to_vec();
    if let Some(email) = email {
        inputs.push(email.local_part());
        inputs.extend(
            email
                .as_str()
                .split('@')
                .nth(1)
                .and_then(|d| d.split('.').next()),
        );
    }
    u8::from(zxcvbn::zxcvbn(&prefix, &inputs).score())
}

/// Whether the password, compared without regard to ASCII case, is on the common list.
pub fn is_common(password: &str) -> bool {
    let needle = password.to_ascii_lowercase();
    let needle = needle.as_bytes();
    let list = COMMON.as_bytes();
    // Binary search over the lines of a sorted text, without building an index.
    let (mut lo, mut hi) = (0, list.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let start = list[..mid]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
            .max(lo);
        let end = list[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(list.len(), |p| start + p);
        match list[start..end].cmp(needle) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => lo = end + 1,
            std::cmp::Ordering::Greater => hi = start,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn codes(password: &str, email: &str) -> Vec<&'static str> {
        let email = Email::parse(email).unwrap();
        PasswordPolicy::default()
            .check(password, Some(&email), &[])
            .into_iter()
            .map(|v| v.code)
            .collect()
    }

    #[test]
    fn the_bundled_list_is_large_and_sorted() {
        let lines: Vec<&str> = COMMON.lines().collect();
        assert!(lines.len() >= 100_000, "{}", lines.len());
        assert!(lines.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()));
        // Every entry is found, so the search agrees with the file.
        for line in lines.iter().step_by(997) {
            assert!(is_common(line), "{line:?}");
        }
        assert!(is_common(lines[0]) && is_common(lines[lines.len() - 1]));
    }

    #[test]
    fn common_passwords_are_found_whatever_their_case() {
        assert!(is_common("password123"));
        assert!(is_common("PassWord123"));
        assert!(is_common("iloveyou"));
        assert!(!is_common("correct horse battery staple unhidra"));
    }

    #[test]
    fn one_violation_per_rule() {
        assert_eq!(codes("short", "a@example.com"), ["too_short", "too_weak"]);
        assert_eq!(
            codes("password1234", "a@example.com"),
            ["too_short", "common_password", "too_weak"]
        );
        assert!(
            codes("alice.wonder-tiger-lamp-9", "alice.wonder@example.com")
                .contains(&"contains_email")
        );
        assert_eq!(codes(&"x".repeat(300), "a@example.com"), ["too_long"]);
        let repeated = codes("aaaaaaaaaaaaaaaaaaaa", "a@example.com");
        assert!(repeated.contains(&"too_weak") && !repeated.contains(&"too_short"));
        assert!(codes("maple orbit candle frost 42", "a@example.com").is_empty());
    }

    #[test]
    fn no_truncation_and_no_composition_rules() {
        // 200 characters is fine, and so is a passphrase of lower-case words and spaces.
        let long = "velvet thunder ".repeat(13) + "quietly";
        assert!(long.chars().count() > 64);
        assert!(
            codes(&long, "a@example.com").is_empty(),
            "{:?}",
            codes(&long, "a@example.com")
        );
        // Unicode counts by characters.
        assert!(codes("ключ морского ветра север", "a@example.com").is_empty());
    }

    proptest! {
        // Each case runs the strength estimator, which is slow on long inputs.
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn check_never_panics(password in "\\PC{0,300}") {
            let email = Email::parse("someone@example.com").unwrap();
            let _ = PasswordPolicy::default().check(&password, Some(&email), &["Some One"]);
        }
    }
}
