//! Access tokens: Ed25519-signed JWTs (RFC 9068 `at+jwt`), the keyset that signs and verifies
//! them, and the JWKS that publishes it.
//!
//! Keys live in the store so that every node verifies with the same set. The newest live key
//! with a private part signs, unless config names a key, which then signs and never enters the
//! database with its private part. Older keys keep verifying until retired, so a rotation logs
//! no one out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration as StdDuration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use unhidra_core::{Clock, Role, UserId};
use unhidra_store::identity::SigningKeyRecord;
use unhidra_store::{Store, StoreError};
use uuid::Uuid;

/// The only algorithm accepted or produced.
pub const ALGORITHM: &str = "EdDSA";
/// RFC 9068's media type of access tokens, in the `typ` header.
pub const TOKEN_TYPE: &str = "at+jwt";
/// An unknown `kid` makes the keyset reload at most this often.
pub const RELOAD_ON_MISS_EVERY: StdDuration = StdDuration::from_secs(5);
/// Keys loaded longer ago than this are reread, to pick up a rotation or retirement made by
/// another node.
pub const RELOAD_EVERY: StdDuration = StdDuration::from_secs(60);

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// The user.
    pub sub: String,
    /// The session (refresh-token family).
    pub sid: String,
    /// The role when issued; requests use the role stored now.
    pub role: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires, Unix seconds.
    pub exp: i64,
    /// This token's id.
    pub jti: String,
}

/// Why a token was refused. The kinds are for logs and tests; clients see one answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or not signed as ours are.
    #[error("malformed token")]
    Malformed,
    /// The header names another algorithm or type.
    #[error("wrong algorithm or type")]
    WrongAlgorithm,
    /// No live key has this kid.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature or a claim does not check out.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Past its `exp`.
    #[error("expired token")]
    Expired,
}

/// Why the keyset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured key is not an Ed25519 PKCS#8 PEM key.
    #[error("signing_key: {0}")]
    Config(String),
    /// Key generation failed.
    #[error("key generation failed")]
    Generate,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key that can sign, and its id.
struct Signer {
    kid: String,
    key: EncodingKey,
}

/// What the store held at the last load.
struct Loaded {
    signer: Signer,
    verifiers: HashMap<String, DecodingKey>,
    jwks: serde_json::Value,
    /// When the store was read, on the injected clock.
    at: DateTime<Utc>,
}

/// Settings of issued tokens.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    /// Lifetime.
    pub ttl: chrono::Duration,
}

/// The signing and verifying keys, reloaded from the store when they may have changed.
pub struct Keyset {
    store: Arc<dyn Store>,
    configured: Option<SigningKeyRecord>,
    settings: TokenSettings,
    clock: Arc<dyn Clock>,
    loaded: RwLock<Arc<Loaded>>,
    /// Held while the keys are read from the store: one read at a time, each later than the
    /// one before it, so that an older read never replaces a newer one.
    reloading: tokio::sync::Mutex<()>,
    /// When a reload was last tried (Unix ms), whether or not the store answered: a failing
    /// store is not asked again on every request.
    tried_at: AtomicI64,
}

impl std::fmt::Debug for Keyset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyset")
            .field("signing_kid", &self.current().signer.kid)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Keyset {
    /// Loads the keyset, registering the configured key or generating a first one.
    pub async fn load(
        store: Arc<dyn Store>,
        configured_pem: Option<&str>,
        settings: TokenSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, KeyError> {
        let now = clock.now();
        let configured = configured_pem
            .map(|pem| key_from_pem(pem, now))
            .transpose()?;
        if let Some(key) = &configured {
            let public_only = SigningKeyRecord {
                private_key: None,
                ..key.clone()
            };
            match store.insert_signing_key(&public_only).await {
                Ok(()) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        } else if !store
            .signing_keys()
            .await?
            .iter()
            .any(|k| k.retired_at.is_none() && k.private_key.is_some())
        {
            store.insert_signing_key(&generate_key(now)?).await?;
        }
        let loaded = build(&*store, configured.as_ref(), now).await?;
        Ok(Self {
            store,
            configured,
            settings,
            clock,
            loaded: RwLock::new(Arc::new(loaded)),
            reloading: tokio::sync::Mutex::new(()),
            tried_at: AtomicI64::new(now.timestamp_millis()),
        })
    }

    /// How long since keys were last read (`loaded_at`, the keys in hand), or a read was tried.
    fn since_tried(&self, now: DateTime<Utc>, loaded_at: DateTime<Utc>) -> StdDuration {
        let tried = DateTime::from_timestamp_millis(self.tried_at.load(Ordering::Relaxed))
            .unwrap_or(now)
            .max(loaded_at);
        (now - tried).to_std().unwrap_or_default()
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(
            &self
                .loaded
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Reads the keys from the store again (after a rotation or retirement elsewhere).
    pub async fn reload(&self) -> Result<(), KeyError> {
        let _one = self.reloading.lock().await;
        self.reload_held().await
    }

    /// [`Self::reload`] with `reloading` held.
    async fn reload_held(&self) -> Result<(), KeyError> {
        let now = self.clock.now();
        self.tried_at
            .store(now.timestamp_millis(), Ordering::Relaxed);
        let fresh = build(&*self.store, self.configured.as_ref(), now).await?;
        *self
            .loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }

    /// Whether the signing key comes from the configuration.
    pub fn is_configured(&self) -> bool {
        self.configured.is_some()
    }

    /// The kid that signs now.
    pub fn signing_kid(&self) -> String {
        self.current().signer.kid.clone()
    }

    /// The JWKS document: every key that may still verify.
    pub fn jwks(&self) -> serde_json::Value {
        self.current().jwks.clone()
    }

    /// Issues an access token; returns it and its lifetime in seconds.
    pub fn issue(
        &self,
        user: UserId,
        session: Uuid,
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<(String, i64), TokenError> {
        let loaded = self.current();
        let ttl = self.settings.ttl.num_seconds();
        let claims = AccessClaims {
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
            sub: user.to_string(),
            sid: session.to_string(),
            role: role.as_str().to_owned(),
            iat: now.timestamp(),
            exp: now.timestamp() + ttl,
            jti: Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(loaded.signer.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &loaded.signer.key)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        Ok((token, ttl))
    }

    /// Checks a token's header, signature, issuer, audience and expiry at `now`.
    pub async fn verify(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(TOKEN_TYPE) || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if header.alg != Algorithm::EdDSA || !typ_ok {
            return Err(TokenError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let mut loaded = self.current();
        // Another node may have rotated or retired a key: keys older than a minute are reread
        // (by one request; the others go on with the keys they have), and an unknown kid is
        // looked up at once, though not more than every few seconds (a request that finds a
        // read under way waits for it).
        let age = self.since_tried(now, loaded.at);
        if !loaded.verifiers.contains_key(&kid) && age >= RELOAD_ON_MISS_EVERY {
            let _one = self.reloading.lock().await;
            if self.since_tried(now, self.current().at) >= RELOAD_ON_MISS_EVERY {
                let _ = self.reload_held().await;
            }
            loaded = self.current();
        } else if age >= RELOAD_EVERY
            && let Ok(_one) = self.reloading.try_lock()
            && self.reload_held().await.is_ok()
        {
            loaded = self.current();
        }
        let key = loaded.verifiers.get(&kid).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Expiry is checked below against the injected clock.
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        if data.claims.exp <= now.timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(data.claims)
    }
}

/// Builds the signer, verifiers and JWKS from the live keys in the store.
async fn build(
    store: &dyn Store,
    configured: Option<&SigningKeyRecord>,
    now: DateTime<Utc>,
) -> Result<Loaded, KeyError> {
    let keys = store.signing_keys().await?;
    let live: Vec<&SigningKeyRecord> = keys.iter().filter(|k| k.retired_at.is_none()).collect();
    let signer_record = match configured {
        Some(key) => key,
        None => live
            .iter()
            .rev()
            .find(|k| k.private_key.is_some())
            .copied()
            .ok_or_else(|| {
                KeyError::Config("no live signing key; run `unhidra keys rotate`".into())
            })?,
    };
    let private = signer_record
        .private_key
        .as_deref()
        .ok_or_else(|| KeyError::Config("the signing key has no private part".into()))?;
    let signer = Signer {
        kid: signer_record.kid.clone(),
        key: EncodingKey::from_ed_der(private),
    };
    let mut verifiers = HashMap::new();
    let mut jwks = Vec::new();
    for key in live {
        verifiers.insert(key.kid.clone(), DecodingKey::from_ed_der(&key.public_key));
        jwks.push(serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": ALGORITHM,
            "use": "sig",
            "kid": key.kid,
            "x": URL_SAFE_NO_PAD.encode(&key.public_key),
        }));
    }
    // A configured key that was retired by mistake still verifies what it signs.
    if let Some(key) = configured {
        verifiers
            .entry(key.kid.clone())
            .or_insert_with(|| DecodingKey::from_ed_der(&key.public_key));
    }
    Ok(Loaded {
        signer,
        verifiers,
        jwks: serde_json::json!({ "keys": jwks }),
        at: now,
    })
}

/// Makes a new generated key the signing key. Servers pick it up at their next reload; the
/// keys before it keep verifying until retired.
pub async fn rotate(store: &dyn Store, now: DateTime<Utc>) -> Result<String, KeyError> {
    let key = generate_key(now)?;
    store.insert_signing_key(&key).await?;
    Ok(key.kid)
}

/// Retires a key: it stops verifying. The key that signs now cannot be retired; rotate first.
pub async fn retire(store: &dyn Store, kid: &str, now: DateTime<Utc>) -> Result<(), KeyError> {
    let keys = store.signing_keys().await?;
    let signing = keys
        .iter()
        .rev()
        .find(|k| k.retired_at.is_none() && k.private_key.is_some());
    if signing.is_some_and(|k| k.kid == kid) {
        return Err(KeyError::Config(format!(
            "{kid} signs tokens now; run `unhidra keys rotate` first"
        )));
    }
    store.retire_signing_key(kid, now).await?;
    Ok(())
}

/// A new Ed25519 key with its private part, ready to store.
pub fn generate_key(now: DateTime<Utc>) -> Result<SigningKeyRecord, KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
    record_from_pkcs8(pkcs8.as_ref(), now).map_err(KeyError::Config)
}

/// Reads a PKCS#8 PEM Ed25519 private key, as `openssl genpkey -algorithm ed25519` writes it.
pub fn key_from_pem(pem: &str, now: DateTime<Utc>) -> Result<SigningKeyRecord, KeyError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(KeyError::Config(
            "expected a PEM block `-----BEGIN PRIVATE KEY-----` (PKCS#8 Ed25519)".into(),
        ));
    }
    let der = STANDARD
        .decode(body)
        .map_err(|_| KeyError::Config("the PEM block is not valid base64".into()))?;
    record_from_pkcs8(&der, now).map_err(KeyError::Config)
}

fn record_from_pkcs8(der: &[u8], now: DateTime<Utc>) -> Result<SigningKeyRecord, String> {
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
        .map_err(|_| "not an Ed25519 PKCS#8 private key".to_owned())?;
    let public = pair.public_key().as_ref().to_vec();
    Ok(SigningKeyRecord {
        kid: thumbprint(&public),
        algorithm: ALGORITHM.to_owned(),
        public_key: public,
        private_key: Some(der.to_vec()),
        created_at: now,
        retired_at: None,
    })
}

/// The RFC 7638 thumbprint of an Ed25519 public key, base64url.
pub fn thumbprint(public: &[u8]) -> String {
    use sha2::Digest;
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()))
}
