//! Authentication and role checks as extractors: a handler that takes `Auth<Admin>` runs only
//! for an admin, and the check lives here, not in each handler.

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use unhidra_core::Role;

use super::TraceId;
use crate::error::ApiError;
use crate::identity::{IdentityError, Principal, RequestContext};
use crate::state::AppState;

/// Which roles an `Auth<R>` admits.
pub trait Requirement: Send + Sync + 'static {
    /// Whether `role` may pass.
    fn admits(role: Role) -> bool;

    /// Whether this requirement is the admin role (which may also need a second factor).
    const REQUIRES_ADMIN: bool = false;
}

/// Any signed-in user.
#[derive(Debug)]
pub struct AnyUser;

impl Requirement for AnyUser {
    fn admits(_: Role) -> bool {
        true
    }
}

/// Admins only.
#[derive(Debug)]
pub struct Admin;

impl Requirement for Admin {
    const REQUIRES_ADMIN: bool = true;

    fn admits(role: Role) -> bool {
        role == Role::Admin
    }
}

/// An authenticated caller whose role satisfies `R`: a valid access token in
/// `Authorization: Bearer`, of a live session of an active user.
#[derive(Debug)]
pub struct Auth<R: Requirement = AnyUser>(pub Principal, pub PhantomData<R>);

impl<R: Requirement> FromRequestParts<AppState> for Auth<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers).ok_or(IdentityError::Unauthenticated("missing"))?;
        let principal = state.identity().authenticate(token).await?;
        if !R::admits(principal.role) {
            return Err(IdentityError::Forbidden.into());
        }
        // Admin routes wait until an admin's session has a second factor, when the config says
        // so; the enrolment routes take any user, so the way there stays open.
        if R::REQUIRES_ADMIN && !principal.has_admin_powers(state.config().require_admin_mfa) {
            return Err(IdentityError::MfaEnrollmentRequired.into());
        }
        Ok(Self(principal, PhantomData))
    }
}

/// The token of `Authorization: Bearer …` when there is one: the scheme in any case (RFC 9110
/// §11.1), the token trimmed. Every route and upgrade that takes a bearer credential (a user's
/// token, a device's key, the metrics token) reads it here.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Where a request comes from, for sessions and the audit log.
#[derive(Debug, Clone)]
pub struct Ctx(pub RequestContext);

/// A `User-Agent` longer than this is cut; it is informational only.
const MAX_USER_AGENT: usize = 256;

impl FromRequestParts<AppState> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let ip = client_ip(peer, &parts.headers, state.trusted_proxies()).map(|ip| ip.to_string());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(MAX_USER_AGENT).collect());
        let trace_id = parts.extensions.get::<TraceId>().map(|t| t.0.clone());
        Ok(Self(RequestContext {
            ip,
            user_agent,
            trace_id,
        }))
    }
}

/// The client's address: the peer's, or — when the peer is a trusted proxy — the right-most
/// address in `X-Forwarded-For` that is not a trusted proxy. Addresses left of it could be
/// made up by the client.
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &axum::http::HeaderMap,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Right to left, past the trusted proxies. An entry that is not an address ends the walk:
    // what stands left of it cannot be trusted.
    let mut client = peer;
    for entry in entries.iter().rev() {
        match entry.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => client = ip,
            Ok(ip) => return Some(ip),
            Err(_) => return Some(client),
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 10.0.0.7, 10.0.0.1".parse().unwrap(),
        );
        let trusted = [ip("10.0.0.1"), ip("127.0.0.1")];
        // From an untrusted peer, the header is ignored.
        assert_eq!(
            client_ip(Some(ip("1.2.3.4")), &headers, &trusted),
            Some(ip("1.2.3.4"))
        );
        // Through trusted proxies, the right-most untrusted address is the client.
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), &headers, &trusted),
            Some(ip("10.0.0.7"))
        );
        // Garbage ends the walk: nothing left of it is believed.
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, junk, 10.0.0.1".parse().unwrap(),
        );
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), &headers, &trusted),
            Some(ip("10.0.0.1"))
        );
        headers.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), &headers, &trusted),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(client_ip(None, &headers, &trusted), None);
    }

    #[test]
    fn the_scheme_is_read_in_any_case_and_an_empty_token_is_none() {
        let with = |value: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            bearer(&headers).map(str::to_owned)
        };
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "Bearer   abc  "] {
            assert_eq!(with(value).as_deref(), Some("abc"), "{value}");
        }
        for value in ["Bearer ", "Bearer", "Basic abc", "Bearerabc", "Token abc"] {
            assert_eq!(with(value), None, "{value}");
        }
        assert_eq!(bearer(&axum::http::HeaderMap::new()), None);
    }
}
