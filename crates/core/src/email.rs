//! Email addresses, parsed once and normalised so that uniqueness is case-insensitive.

use std::fmt;

use serde::{Serialize, Serializer};

/// A syntactically valid email address, lower-cased.
///
/// The accepted syntax is the dot-atom form that real mailboxes use (no quoted local parts, no
/// IP-literal domains, ASCII only); an address outside it is refused rather than stored in a
/// form that could later compare unequal to itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Email(String);

/// Why text is not an email address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    /// Nothing was given.
    #[error("an email address is required")]
    Empty,
    /// More than 254 characters.
    #[error("an email address has at most 254 characters")]
    TooLong,
    /// Not exactly one `@`.
    #[error("an email address has the form name@example.com")]
    Shape,
    /// The part before `@` is not valid.
    #[error("the part before @ is not valid")]
    Local,
    /// The part after `@` is not a valid domain name.
    #[error("the part after @ is not a valid domain name")]
    Domain,
}

impl EmailError {
    /// A stable code for API errors.
    pub fn code(self) -> &'static str {
        match self {
            Self::Empty => "required",
            Self::TooLong => "too_long",
            Self::Shape | Self::Local | Self::Domain => "invalid_email",
        }
    }
}

const LOCAL_SPECIALS: &[u8] = b"!#$%&'*+/=?^_`{|}~-";

impl Email {
    /// Parses and normalises an address: surrounding whitespace is dropped and it is
    /// lower-cased.
    pub fn parse(text: &str) -> Result<Self, EmailError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(EmailError::Empty);
        }
        if text.len() > 254 {
            return Err(EmailError::TooLong);
        }
        let mut parts = text.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(EmailError::Shape);
        };
        if !valid_local(local) {
            return Err(EmailError::Local);
        }
        if !valid_domain(domain) {
            return Err(EmailError::Domain);
        }
        Ok(Self(text.to_ascii_lowercase()))
    }

    /// The normalised address.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before `@`.
    pub fn local_part(&self) -> &str {
        self.0.split('@').next().unwrap_or_default()
    }
}

fn valid_local(local: &str) -> bool {
    (1..=64).contains(&local.len())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || LOCAL_SPECIALS.contains(&b))
}

fn valid_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && domain.len() <= 253
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Email {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn valid_addresses_are_normalised() {
        let e = Email::parse("  Alice.Smith+tag@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "alice.smith+tag@example.com");
        assert_eq!(e.local_part(), "alice.smith+tag");
        for ok in [
            "a@b.co",
            "o'brien@mail.example.org",
            "x_y-z@sub-domain.example.io",
        ] {
            assert!(Email::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn invalid_addresses_say_why() {
        assert_eq!(Email::parse(""), Err(EmailError::Empty));
        assert_eq!(Email::parse("   "), Err(EmailError::Empty));
        assert_eq!(Email::parse("no-at-sign"), Err(EmailError::Shape));
        assert_eq!(Email::parse("a@b@c.com"), Err(EmailError::Shape));
        assert_eq!(Email::parse("@example.com"), Err(EmailError::Local));
        assert_eq!(Email::parse(".a@example.com"), Err(EmailError::Local));
        assert_eq!(Email::parse("a..b@example.com"), Err(EmailError::Local));
        assert_eq!(Email::parse("a b@example.com"), Err(EmailError::Local));
        assert_eq!(Email::parse("a@localhost"), Err(EmailError::Domain));
        assert_eq!(Email::parse("a@-x.com"), Err(EmailError::Domain));
        assert_eq!(Email::parse("a@1.2.3.4"), Err(EmailError::Domain));
        assert_eq!(Email::parse("a@exämple.com"), Err(EmailError::Domain));
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(Email::parse(&long), Err(EmailError::TooLong));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_is_idempotent(text in "\\PC{0,80}") {
            if let Ok(email) = Email::parse(&text) {
                let again = Email::parse(email.as_str()).unwrap();
                prop_assert_eq!(&again, &email);
                prop_assert_eq!(email.as_str(), email.as_str().to_ascii_lowercase());
            }
        }

        #[test]
        fn case_does_not_make_a_new_address(
            local in "[a-zA-Z0-9]{1,20}",
            domain in "[a-zA-Z]{1,20}\\.[a-zA-Z]{2,6}",
        ) {
            let lower = Email::parse(&format!("{local}@{domain}").to_lowercase()).unwrap();
            let upper = Email::parse(&format!("{local}@{domain}").to_uppercase()).unwrap();
            prop_assert_eq!(lower, upper);
        }
    }
}
