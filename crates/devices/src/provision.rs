//! Provisioning: a user makes a token (for a model and tags, single- or multi-use, expiring)
//! and gets it as a QR code whose payload is ESP-IDF's `wifi_prov_mgr` JSON with the token
//! added; a device exchanges the token for its own key at `POST /api/v1/devices/claim`. A
//! device that claims again with the same `hardware_id` (after a factory reset) keeps its
//! identity, and its old keys are revoked.

use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use unhidra_core::ratelimit::address_key;
use unhidra_core::{Principal, UserId};
use unhidra_identity::RequestContext;
use unhidra_store::StoreError;
use unhidra_store::devices::{
    Claim, ClaimOutcome, ClaimRefusal, DeviceRecord, DeviceStatus, ProvisioningTokenRecord,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{ClaimToken, DeviceError, DeviceKey, DeviceView, Devices, FleetEvent, input, new_key};

/// Claims one token allows when none is asked for.
pub const DEFAULT_USES: u32 = 1;
/// The most claims one token may allow.
pub const MAX_USES: u32 = 10_000;
/// How long a token works when no `ttl` is asked for: a day.
pub const DEFAULT_TTL_SECS: u64 = 24 * 3600;
/// The shortest `ttl`.
pub const MIN_TTL_SECS: u64 = 60;
/// The longest `ttl`: 30 days.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// Tokens a listing shows at most (the newest).
pub const LIST_LIMIT: u32 = 200;
/// The longest service name and proof of possession in a provisioning payload.
pub const MAX_PROV_FIELD: usize = 64;

/// What a user asks for.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewProvisioningToken)]
pub struct NewToken {
    /// The model a claiming device must report (1 to 64 of ASCII letters, digits and `._:-`).
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
    pub model: String,
    /// The tags the devices it makes get (at most 32).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Claims it allows, 1 to 10000 (default 1: a single-use token).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10000)]
    pub max_uses: Option<u32>,
    /// Seconds it works, 60 to 2592000 (default 86400).
    #[serde(default)]
    #[schema(minimum = 60, maximum = 2592000)]
    pub ttl: Option<u64>,
    /// Whose devices it makes (an admin may name another user; default the caller).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub owner: Option<Uuid>,
    /// The `wifi_prov_mgr` fields of the QR code's payload.
    #[serde(default, deserialize_with = "object_only")]
    pub provisioning: Option<WifiProvisioning>,
}

/// A JSON object as a struct; serde would also take a struct's fields from an array, which the
/// API does not.
fn object_only<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let map: Option<serde_json::Map<String, serde_json::Value>> =
        Option::deserialize(deserializer)?;
    map.map(|map| serde_json::from_value(serde_json::Value::Object(map)))
        .transpose()
        .map_err(serde::de::Error::custom)
}

/// The fields of ESP-IDF's `wifi_prov_mgr` QR payload that the provisioning app reads.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WifiProvisioning)]
pub struct WifiProvisioning {
    /// The device's provisioning service name (`PROV_…`, default `PROV_` and the model).
    #[serde(default)]
    pub name: Option<String>,
    /// Its proof of possession, if its security scheme has one.
    #[serde(default)]
    pub pop: Option<String>,
    /// `ble` (default) or `softap`.
    #[serde(default)]
    pub transport: Option<String>,
}

/// A provisioning token as the API shows it (never the token).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = ProvisioningToken)]
pub struct TokenView {
    /// Its id.
    #[schema(value_type = String)]
    pub id: Uuid,
    /// Whose devices it makes.
    #[schema(value_type = String)]
    pub owner: Uuid,
    /// Who made it.
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Uuid>,
    /// Its first characters.
    pub prefix: String,
    /// The model a claiming device must report.
    pub model: String,
    /// The tags its devices get.
    pub tags: Vec<String>,
    /// Claims it allows.
    pub max_uses: i64,
    /// Claims made with it.
    pub uses: i64,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When a device last claimed with it.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Whether a device can claim with it now.
    pub usable: bool,
}

impl TokenView {
    fn new(token: ProvisioningTokenRecord, now: DateTime<Utc>) -> Self {
        Self {
            usable: token.revoked_at.is_none()
                && token.expires_at > now
                && token.uses < token.max_uses,
            id: token.id,
            owner: token.owner.0,
            created_by: token.created_by.map(|u| u.0),
            prefix: token.prefix,
            model: token.model,
            tags: token.tags,
            max_uses: token.max_uses,
            uses: token.uses,
            created_at: token.created_at,
            expires_at: token.expires_at,
            revoked_at: token.revoked_at,
            last_used_at: token.last_used_at,
        }
    }
}

/// A new token: the token itself is in this answer only.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = ProvisioningTokenCreated)]
pub struct CreatedToken {
    /// The token.
    pub token: TokenView,
    /// The token itself (`unh_pt_…`), shown this once.
    pub secret: String,
    /// The QR code's payload: `wifi_prov_mgr` JSON with `token` (and `url`, when the server
    /// knows its public URL) added.
    pub qr_payload: String,
    /// The payload as a QR code, an SVG image.
    pub qr_svg: String,
}

/// What a device sends to claim.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DeviceClaim)]
pub struct ClaimRequest {
    /// The provisioning token (`unh_pt_…`).
    pub token: String,
    /// The hardware's own id (a MAC or chip id): a claim with the same one later keeps the
    /// device.
    pub hardware_id: String,
    /// Its model, which must be the token's.
    pub model: String,
    /// The firmware version it runs.
    #[serde(default)]
    pub firmware: Option<String>,
    /// A name for a new device (default: the model and the hardware id).
    #[serde(default)]
    pub name: Option<String>,
}

/// A device's claim answered: the device and its new key, shown this once.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeviceClaimed)]
pub struct Claimed {
    /// The device.
    pub device: DeviceView,
    /// Its API key (`unh_dk_…`): store it now.
    pub key: String,
    /// Whether the device existed (a claim after a factory reset): its old keys no longer
    /// work.
    pub reclaimed: bool,
}

fn invalid(field: &'static str, code: &'static str, message: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(field, code, message.into())
}

/// A `wifi_prov_mgr` text field: printable ASCII, 1 to 64 characters.
fn prov_field(field: &'static str, text: &str) -> Result<String, DeviceError> {
    if text.is_empty()
        || text.len() > MAX_PROV_FIELD
        || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(invalid(
            field,
            "invalid_format",
            format!("1 to {MAX_PROV_FIELD} printable ASCII characters"),
        ));
    }
    Ok(text.to_owned())
}

/// The QR payload: `{"ver":"v1","name":…,"pop":…,"transport":…}` as ESP-IDF's provisioning
/// apps read it, with `token` and `url` added.
fn payload(
    prov: Option<&WifiProvisioning>,
    model: &str,
    token: &ClaimToken,
    url: Option<&str>,
) -> Result<String, DeviceError> {
    let empty = WifiProvisioning::default();
    let prov = prov.unwrap_or(&empty);
    let name = match &prov.name {
        Some(name) => prov_field("/provisioning/name", name)?,
        None => format!("PROV_{model}")
            .chars()
            .take(MAX_PROV_FIELD)
            .collect(),
    };
    let transport = match prov.transport.as_deref() {
        None | Some("ble") => "ble",
        Some("softap") => "softap",
        Some(_) => {
            return Err(invalid(
                "/provisioning/transport",
                "invalid_value",
                "the transport is `ble` or `softap`",
            ));
        }
    };
    let mut json = serde_json::json!({ "ver": "v1", "name": name, "transport": transport });
    if let Some(pop) = &prov.pop {
        json["pop"] = prov_field("/provisioning/pop", pop)?.into();
    }
    json["token"] = token.expose().into();
    if let Some(url) = url {
        json["url"] = url.into();
    }
    Ok(json.to_string())
}

/// A refusal's name, for metrics and the problem's `code`.
pub fn refusal_name(why: &ClaimRefusal) -> &'static str {
    match why {
        ClaimRefusal::Unknown => "unknown",
        ClaimRefusal::Expired => "expired",
        ClaimRefusal::UsedUp => "used_up",
        ClaimRefusal::WrongModel(_) => "wrong_model",
        ClaimRefusal::NotReclaimable => "not_reclaimable",
    }
}

impl Devices {
    /// Makes a provisioning token for the caller's devices (or, for an admin, another user's)
    /// and answers it with its QR code; the token is shown this once.
    pub async fn create_token(
        &self,
        who: &Principal,
        new: NewToken,
        ip: Option<IpAddr>,
        ctx: &RequestContext,
    ) -> Result<CreatedToken, DeviceError> {
        let model = input::ident("/model", &new.model)?;
        let tags = input::tags(&new.tags)?;
        let max_uses = new.max_uses.unwrap_or(DEFAULT_USES);
        if !(1..=MAX_USES).contains(&max_uses) {
            return Err(invalid(
                "/max_uses",
                "out_of_range",
                format!("a token allows 1 to {MAX_USES} claims"),
            ));
        }
        let ttl = new.ttl.unwrap_or(DEFAULT_TTL_SECS);
        if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl) {
            return Err(invalid(
                "/ttl",
                "out_of_range",
                format!("a token works {MIN_TTL_SECS} to {MAX_TTL_SECS} seconds"),
            ));
        }
        let token = ClaimToken::generate();
        let qr_payload = payload(
            new.provisioning.as_ref(),
            &model,
            &token,
            self.0.config.public_url.as_deref(),
        )?;
        let qr_svg = unhidra_core::qr::svg(&qr_payload).ok_or_else(|| {
            invalid(
                "/provisioning",
                "too_long",
                "the payload is too long for a QR code",
            )
        })?;
        let owner = self.owner_for(who, new.owner.map(UserId)).await?;
        let now = self.now();
        self.limit_registration(who, ip, now)?;
        let record = ProvisioningTokenRecord {
            id: Uuid::new_v4(),
            owner,
            created_by: Some(who.user_id),
            prefix: token.shown(),
            model,
            tags,
            max_uses: i64::from(max_uses),
            uses: 0,
            created_at: now,
            expires_at: now + Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX)),
            revoked_at: None,
            last_used_at: None,
        };
        self.0
            .store
            .create_provisioning_token(&record, &token.hash())
            .await?;
        self.0
            .audit
            .record(
                "provisioning_token.created",
                Some(who.user_id),
                Some(record.id.to_string()),
                ctx,
                serde_json::json!({
                    "owner": owner, "model": record.model, "max_uses": max_uses,
                    "expires_at": record.expires_at, "token": record.prefix,
                }),
            )
            .await;
        Ok(CreatedToken {
            token: TokenView::new(record, now),
            secret: token.expose().to_owned(),
            qr_payload,
            qr_svg,
        })
    }

    /// The caller's provisioning tokens (an admin's: everyone's), newest first.
    pub async fn tokens(&self, who: &Principal) -> Result<Vec<TokenView>, DeviceError> {
        let owner = (!self.is_admin(who)).then_some(who.user_id);
        let now = self.now();
        Ok(self
            .0
            .store
            .provisioning_tokens(owner, LIST_LIMIT)
            .await?
            .into_iter()
            .map(|t| TokenView::new(t, now))
            .collect())
    }

    /// Revokes a provisioning token the caller owns (or any, for an admin): no device can
    /// claim with it from now on; the devices it made keep their keys.
    pub async fn revoke_token(
        &self,
        who: &Principal,
        id: Uuid,
        ctx: &RequestContext,
    ) -> Result<(), DeviceError> {
        let token = match self.0.store.provisioning_token(id).await {
            Err(StoreError::NotFound { .. }) => {
                return Err(DeviceError::NotFound("provisioning token"));
            }
            other => other?,
        };
        if !self.is_admin(who) && token.owner != who.user_id {
            return Err(DeviceError::NotFound("provisioning token"));
        }
        if self
            .0
            .store
            .revoke_provisioning_token(id, self.now())
            .await?
        {
            self.0
                .audit
                .record(
                    "provisioning_token.revoked",
                    Some(who.user_id),
                    Some(id.to_string()),
                    ctx,
                    serde_json::json!({ "owner": token.owner, "uses": token.uses }),
                )
                .await;
        }
        Ok(())
    }

    /// A device exchanges a provisioning token for its own key: a new device owned by the
    /// token's owner, or, when that owner has a device with this hardware id, that device
    /// again, whose old keys are revoked (its connections close with 4003). Every refusal
    /// changes nothing and uses no claim of the token.
    pub async fn claim(
        &self,
        request: ClaimRequest,
        ip: Option<IpAddr>,
        ctx: &RequestContext,
    ) -> Result<Claimed, DeviceError> {
        let hardware_id = input::ident("/hardware_id", &request.hardware_id)?;
        let model = input::ident("/model", &request.model)?;
        let firmware = request
            .firmware
            .as_deref()
            .map(|f| input::ident("/firmware", f))
            .transpose()?;
        let name = match request.name.as_deref() {
            Some(name) => input::name(name)?,
            None => format!("{model} {hardware_id}"),
        };
        let now = self.now();
        // Every attempt with a well-formed body counts, so that tokens cannot be guessed
        // from one address at speed (they cannot be guessed anyway: 256 bits).
        if let Some(ip) = ip {
            let key = address_key(ip, self.0.config.ipv6_prefix);
            self.limit(&self.0.claims_per_ip, &key, "claim_ip", "claims", now)?;
        }
        let Some(token) = ClaimToken::from_client(&request.token) else {
            self.0.metrics.claim("unknown");
            return Err(DeviceError::Claim(ClaimRefusal::Unknown));
        };
        let key = DeviceKey::generate();
        let claim = Claim {
            token_hash: token.hash(),
            model: model.clone(),
            firmware,
            device: DeviceRecord {
                id: Uuid::new_v4(),
                owner: None,
                name,
                model,
                location: None,
                tags: Vec::new(),
                metadata: "{}".into(),
                hardware_id: Some(hardware_id.clone()),
                firmware: None,
                status: DeviceStatus::Offline,
                last_seen: None,
                inactivity_timeout: None,
                heartbeat: None,
                created_at: now,
                updated_at: now,
            },
            key: new_key(&key, now),
            now,
        };
        // Two first claims of one hardware id at once: the second finds the first's device.
        let outcome = match self.0.store.claim_device(&claim).await {
            Err(StoreError::Conflict { .. }) => self.0.store.claim_device(&claim).await?,
            other => other?,
        };
        let (record, reclaimed, revoked) = match outcome {
            ClaimOutcome::Claimed(record) => (record, false, 0),
            ClaimOutcome::Reclaimed { device, revoked } => (device, true, revoked),
            ClaimOutcome::Refused(why) => {
                self.0.metrics.claim(refusal_name(&why));
                tracing::info!(refusal = ?why, hardware_id, "device claim refused");
                return Err(DeviceError::Claim(why));
            }
        };
        if reclaimed {
            self.0.metrics.claim("reclaimed");
            self.emit(FleetEvent::Revoked { device: record.id });
        } else {
            self.0.metrics.claim("claimed");
            self.0.metrics.registered.inc();
        }
        self.0
            .audit
            .record(
                if reclaimed {
                    "device.reclaimed"
                } else {
                    "device.claimed"
                },
                None,
                Some(record.id.to_string()),
                ctx,
                serde_json::json!({
                    "owner": record.owner, "model": record.model, "hardware_id": hardware_id,
                    "token": token.shown(), "key": key.shown(), "keys_revoked": revoked,
                }),
            )
            .await;
        Ok(Claimed {
            device: self.view(record),
            key: key.expose().to_owned(),
            reclaimed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_wifi_prov_mgr_json_with_the_token() {
        let token = ClaimToken::generate();
        let prov = WifiProvisioning {
            name: Some("PROV_a1b2c3".into()),
            pop: Some("abcd1234".into()),
            transport: Some("softap".into()),
        };
        let text = payload(Some(&prov), "esp32-s3", &token, Some("https://u.example/")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "ver": "v1", "name": "PROV_a1b2c3", "pop": "abcd1234", "transport": "softap",
                "token": token.expose(), "url": "https://u.example/",
            })
        );
        let text = payload(None, "esp32-s3", &token, None).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["name"], "PROV_esp32-s3");
        assert_eq!(json["transport"], "ble");
        assert!(json.get("pop").is_none() && json.get("url").is_none());
    }

    #[test]
    fn provisioning_fields_come_from_an_object_only() {
        let parsed: NewToken =
            serde_json::from_str(r#"{"model":"m","provisioning":{"name":"PROV_1"}}"#).unwrap();
        assert_eq!(parsed.provisioning.unwrap().name.as_deref(), Some("PROV_1"));
        for bad in [
            r#"{"model":"m","provisioning":[null,null,null]}"#,
            r#"{"model":"m","provisioning":{"nam":"x"}}"#,
        ] {
            assert!(serde_json::from_str::<NewToken>(bad).is_err(), "{bad}");
        }
        let none: NewToken = serde_json::from_str(r#"{"model":"m","provisioning":null}"#).unwrap();
        assert!(none.provisioning.is_none());
    }

    #[test]
    fn bad_provisioning_fields_are_refused() {
        let token = ClaimToken::generate();
        for (prov, field) in [
            (
                WifiProvisioning {
                    transport: Some("wifi".into()),
                    ..Default::default()
                },
                "/provisioning/transport",
            ),
            (
                WifiProvisioning {
                    name: Some("bad\nname".into()),
                    ..Default::default()
                },
                "/provisioning/name",
            ),
            (
                WifiProvisioning {
                    pop: Some("x".repeat(65)),
                    ..Default::default()
                },
                "/provisioning/pop",
            ),
        ] {
            match payload(Some(&prov), "m", &token, None) {
                Err(DeviceError::Invalid(f, ..)) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
