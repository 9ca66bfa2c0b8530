//! Authentication and role checks as extractors: a handler that takes `Auth<Admin>` runs only
//! for an admin, and the check lives here, not in each handler.

use std::marker::PhantomData;
use std::net::SocketAddr;

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
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(IdentityError::Unauthenticated("missing"))?;
        let principal = state.identity().authenticate(token).await?;
        if !R::admits(principal.role) {
            return Err(IdentityError::Forbidden.into());
        }
        Ok(Self(principal, PhantomData))
    }
}

/// Where a request comes from, for sessions and the audit log.
#[derive(Debug, Clone)]
pub struct Ctx(pub RequestContext);

/// A `User-Agent` longer than this is cut; it is informational only.
const MAX_USER_AGENT: usize = 256;

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
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
