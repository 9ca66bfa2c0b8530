//! Who a user is: an id and a role.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user's id: a random UUID, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Uuid);

impl UserId {
    /// A new random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for UserId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for UserId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// What a user may do. Admins manage users and see the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everyone.
    User,
    /// Manages users, devices and settings.
    Admin,
}

impl Role {
    /// The name as stored and as carried in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "admin" => Ok(Self::Admin),
            other => Err(format!("{other:?} is not a role; use user or admin")),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user_id: UserId,
    /// Their role now (not when the token was issued).
    pub role: Role,
    /// The session the token belongs to.
    pub session_id: Uuid,
    /// Whether this session was authenticated with a second factor (its login finished with a
    /// TOTP or recovery code, or it enrolled TOTP) that the account still has. A session opened
    /// with the password alone never gains it, whatever the account enrols later.
    pub mfa: bool,
}

impl Principal {
    /// Whether this principal may use site-admin powers: an admin, and, when `require_mfa`
    /// (`require_admin_mfa`), one with a second factor. Every admin power asks this, so that an
    /// admin who has not enrolled is an ordinary user everywhere until they do.
    pub fn has_admin_powers(&self, require_mfa: bool) -> bool {
        self.role == Role::Admin && (self.mfa || !require_mfa)
    }
}
