//! `/api/v1/auth/*` and `/.well-known/jwks.json`: accounts, tokens and sessions.

use axum::Json as JsonResponse;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Auth, Ctx};
use crate::http::extract::Json;
use crate::identity::mfa::{LoginOutcome, MfaChallenge, TotpSetup};
use crate::identity::{IdentityError, TokenPair, UserView, hasher};
use crate::state::AppState;

impl From<IdentityError> for ApiError {
    fn from(err: IdentityError) -> Self {
        use IdentityError as E;
        match err {
            E::InvalidEmail(e) => {
                Self::validation(vec![FieldError::new("/email", e.code(), e.to_string())])
            }
            E::WeakPassword(broken) => Self::validation(
                broken
                    .into_iter()
                    .map(|v| FieldError::new("/password", v.code, v.message))
                    .collect(),
            ),
            E::DisplayNameTooLong => Self::validation(vec![FieldError::new(
                "/display_name",
                "too_long",
                format!(
                    "use at most {} characters",
                    crate::identity::MAX_DISPLAY_NAME
                ),
            )]),
            E::DisplayNameInvalid => Self::validation(vec![FieldError::new(
                "/display_name",
                "invalid_characters",
                "a display name has no control characters or bidirectional overrides",
            )]),
            E::EmailTaken => Problem::new(
                StatusCode::CONFLICT,
                "email_taken",
                "An account with this email exists.",
            )
            .into(),
            E::InvalidCredentials => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "The email or password is wrong.",
            )
            .into(),
            E::Locked { retry_after } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "account_locked",
                "Too many failed logins; the account is locked for a while.",
            )
            .with("retry_after", retry_after)
            .into(),
            E::RateLimited { retry_after } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many attempts; wait before trying again.",
            )
            .with("retry_after", retry_after)
            .into(),
            E::Disabled => Problem::new(
                StatusCode::FORBIDDEN,
                "account_disabled",
                "This account is deactivated.",
            )
            .into(),
            E::InvalidRefreshToken => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_refresh_token",
                "The refresh token is unknown, expired or its session has ended.",
            )
            .into(),
            E::RefreshTokenReused => Problem::new(
                StatusCode::UNAUTHORIZED,
                "refresh_token_reused",
                "This refresh token was used before; its session is revoked. Log in again.",
            )
            .into(),
            E::Unauthenticated(reason) => {
                let (code, detail) = match reason {
                    "missing" => (
                        "unauthenticated",
                        "Send an access token as Authorization: Bearer.",
                    ),
                    "expired" => ("token_expired", "The access token has expired; refresh it."),
                    "revoked" => ("session_revoked", "The session of this token has ended."),
                    "disabled" => ("account_disabled", "This account is deactivated."),
                    _ => ("invalid_token", "The access token is not valid."),
                };
                Problem::new(StatusCode::UNAUTHORIZED, code, detail).into()
            }
            E::Forbidden => Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Your role does not allow this.",
            )
            .into(),
            E::SelfChange => Problem::new(
                StatusCode::CONFLICT,
                "cannot_change_self",
                "An admin cannot demote or deactivate themselves.",
            )
            .into(),
            E::EmailNotVerified => Problem::new(
                StatusCode::FORBIDDEN,
                "email_not_verified",
                "Verify your email address first; the link was mailed to you.",
            )
            .into(),
            E::BadMailToken => Problem::new(
                StatusCode::BAD_REQUEST,
                "expired_or_used_token",
                "This link or code is unknown, was used already or has expired.",
            )
            .into(),
            E::WrongCurrentPassword => Self::validation(vec![FieldError::new(
                "/current_password",
                "wrong_password",
                "the current password is wrong",
            )]),
            E::TotpAlreadyEnabled => Problem::new(
                StatusCode::CONFLICT,
                "totp_already_enabled",
                "Two-factor authentication is on already; turn it off first to set it up again.",
            )
            .into(),
            E::TotpNotSetUp => Problem::new(
                StatusCode::CONFLICT,
                "totp_not_set_up",
                "There is no TOTP secret in this state; call /api/v1/auth/totp/setup first.",
            )
            .into(),
            E::WrongCode => Self::validation(vec![FieldError::new(
                "/code",
                "wrong_code",
                "the code is wrong, expired, or was used before",
            )]),
            E::BadMfaToken => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_mfa_token",
                "The login step expired or was used up; log in again.",
            )
            .into(),
            E::MfaEnrollmentRequired => Problem::new(
                StatusCode::FORBIDDEN,
                "mfa_enrollment_required",
                "Admins need a session verified with two-factor authentication: set it up under \
                 /api/v1/auth/totp, or log in again with a code.",
            )
            .into(),
            E::ReauthenticationRequired => Problem::new(
                StatusCode::FORBIDDEN,
                "reauthentication_required",
                "Confirm your password first: POST /api/v1/auth/reauthenticate, then retry within \
                 the next few minutes.",
            )
            .into(),
            E::KeyFromConfig => Problem::new(
                StatusCode::CONFLICT,
                "signing_key_configured",
                "The signing key comes from the configuration: point signing_key at a new key \
                 and restart; the old one keeps verifying until retired.",
            )
            .into(),
            E::KeyInUse => Problem::new(
                StatusCode::CONFLICT,
                "key_in_use",
                "This key signs new tokens; rotate first, then retire it.",
            )
            .into(),
            E::Crypto(e) => Self::internal(IdentityError::Crypto(e)),
            E::NotFound(what) => Self::not_found(what),
            E::Store(e) => e.into(),
            E::Hash(hasher::HashError::Busy) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "Too many logins are being checked; try again in a moment.",
            )
            .with("retry_after", 1)
            .into(),
            E::Hash(e) => Self::internal(e),
            E::Signing(e) => Self::internal(e),
        }
    }
}

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    /// The email; it is normalised to lower case.
    #[schema(max_length = 254, example = "ada@example.com")]
    email: String,
    /// The password: at least 15 characters by default, not a common one, not containing the
    /// email, and hard to guess.
    #[schema(min_length = 8, max_length = 256)]
    password: String,
    /// The name shown to others: no control characters or bidirectional overrides.
    #[schema(
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    display_name: Option<String>,
}

/// Creates an account.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterBody,
    responses(
        (status = 201, description = "Created", body = UserView),
        (status = 409, description = "The email has an account (unless accounts are hidden)",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid email or password; one entry per broken rule",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn register(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, JsonResponse<UserView>), ApiError> {
    let user = state
        .identity()
        .register(
            &body.email,
            &body.password,
            body.display_name.as_deref(),
            &ctx,
        )
        .await?;
    Ok((StatusCode::CREATED, JsonResponse(user)))
}

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    /// The account's email.
    email: String,
    /// Its password.
    password: String,
}

/// A login's answer: tokens, or a request for the second factor.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum LoginAnswer {
    /// Logged in.
    Tokens(TokenPair),
    /// The password was right; send a code to `/api/v1/auth/login/mfa`.
    Mfa(MfaChallenge),
}

/// Logs in: opens a session and returns an access token and a refresh token — or, for an
/// account with two-factor authentication, `{mfa_required, mfa_token}`.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginBody,
    responses(
        (status = 200, description = "Logged in, or a code is due", body = LoginAnswer),
        (status = 401, description = "Wrong email or password (also for a locked account when \
            accounts are hidden)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The account is deactivated", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "The email is not an email address", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many failures from this address, or the account is \
            locked", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn login(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<LoginBody>,
) -> Result<JsonResponse<LoginAnswer>, ApiError> {
    Ok(JsonResponse(
        match state
            .identity()
            .login(&body.email, &body.password, &ctx)
            .await?
        {
            LoginOutcome::Tokens(pair) => LoginAnswer::Tokens(pair),
            LoginOutcome::MfaRequired(challenge) => LoginAnswer::Mfa(challenge),
        },
    ))
}

/// The login challenge and a code.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MfaBody {
    /// From the login's answer.
    mfa_token: String,
    /// A 6-digit TOTP code, or a recovery code.
    #[schema(max_length = 64)]
    code: String,
}

/// Finishes a login with a TOTP code or a recovery code.
#[utoipa::path(post, path = "/api/v1/auth/login/mfa", tag = "auth", request_body = MfaBody,
    responses(
        (status = 200, description = "Logged in", body = TokenPair),
        (status = 401, description = "The login step expired or was used up", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "Wrong or reused code", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many failures from this address, or the account is \
            locked", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn login_mfa(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<MfaBody>,
) -> Result<JsonResponse<TokenPair>, ApiError> {
    Ok(JsonResponse(
        state
            .identity()
            .login_mfa(&body.mfa_token, &body.code, &ctx)
            .await?,
    ))
}

/// Starts TOTP enrolment: a secret, its `otpauth://` URI and a QR code. Enable it with a code.
/// Needs the password presented within `reauth_window` (at login or on re-authentication).
#[utoipa::path(post, path = "/api/v1/auth/totp/setup", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The new secret", body = TotpSetup),
        (status = 403, description = "The password was not presented within \
            `reauth_window`; re-authenticate first", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "TOTP is on already", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn totp_setup(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
) -> Result<JsonResponse<TotpSetup>, ApiError> {
    Ok(JsonResponse(state.identity().totp_setup(&who).await?))
}

/// A TOTP or recovery code.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeBody {
    /// A 6-digit TOTP code (or, to disable, a recovery code).
    #[schema(max_length = 64)]
    code: String,
}

/// The recovery codes, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RecoveryCodes {
    /// Ten single-use codes for when the authenticator is lost.
    recovery_codes: Vec<String>,
}

/// Turns TOTP on with a first code from the app; answers the recovery codes. Needs a recent
/// password, like setup. This session counts as verified with the second factor from now on;
/// the account's other sessions end.
#[utoipa::path(post, path = "/api/v1/auth/totp/enable", tag = "auth",
    security(("bearer" = [])), request_body = CodeBody,
    responses(
        (status = 200, description = "On", body = RecoveryCodes),
        (status = 403, description = "The password was not presented within \
            `reauth_window`; re-authenticate first", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "Not set up, or on already", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "Wrong code", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn totp_enable(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Json(body): Json<CodeBody>,
) -> Result<JsonResponse<RecoveryCodes>, ApiError> {
    let recovery_codes = state.identity().totp_enable(&who, &body.code, &ctx).await?;
    Ok(JsonResponse(RecoveryCodes { recovery_codes }))
}

/// Turns TOTP off; needs a current code or a recovery code, and a recent password.
#[utoipa::path(post, path = "/api/v1/auth/totp/disable", tag = "auth",
    security(("bearer" = [])), request_body = CodeBody,
    responses(
        (status = 204, description = "Off"),
        (status = 403, description = "The password was not presented within \
            `reauth_window`; re-authenticate first", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "TOTP is not on", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "Wrong code", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn totp_disable(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Json(body): Json<CodeBody>,
) -> Result<StatusCode, ApiError> {
    state
        .identity()
        .totp_disable(&who, &body.code, &ctx)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReauthenticateBody {
    /// The account's password.
    current_password: String,
}

/// Confirms the caller's password for this session, which may then set up, enable or disable
/// TOTP for `reauth_window`. A wrong password counts towards the account's lockout like a
/// failed login.
#[utoipa::path(post, path = "/api/v1/auth/reauthenticate", tag = "auth",
    security(("bearer" = [])), request_body = ReauthenticateBody,
    responses(
        (status = 204, description = "Confirmed"),
        (status = 401, description = "No valid access token", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "Wrong password", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, description = "Too many wrong passwords, or the account is locked",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn reauthenticate(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Json(body): Json<ReauthenticateBody>,
) -> Result<StatusCode, ApiError> {
    state
        .identity()
        .reauthenticate(&who, &body.current_password, &ctx)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A refresh token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    /// The refresh token from the last login or refresh.
    refresh_token: String,
}

/// Trades a refresh token for a new pair. Each refresh token works once: using one again
/// revokes its session.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshBody,
    responses(
        (status = 200, description = "A new pair", body = TokenPair),
        (status = 401, description = "Unknown, expired or reused refresh token", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn refresh(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<RefreshBody>,
) -> Result<JsonResponse<TokenPair>, ApiError> {
    Ok(JsonResponse(
        state.identity().refresh(&body.refresh_token, &ctx).await?,
    ))
}

/// Ends the current session; its tokens stop working at once.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "No valid access token", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn logout(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
) -> Result<StatusCode, ApiError> {
    state.identity().logout(&who, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's account.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account", body = UserView),
        (status = 401, description = "No valid access token", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn me(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
) -> Result<JsonResponse<UserView>, ApiError> {
    Ok(JsonResponse(state.identity().me(&who).await?))
}

/// A live session of the caller.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionView {
    id: String,
    user_agent: Option<String>,
    ip: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    last_used_at: chrono::DateTime<chrono::Utc>,
    expires_at: chrono::DateTime<chrono::Utc>,
    /// Whether this is the session of the token that asked.
    current: bool,
}

/// The caller's live sessions, newest first.
#[utoipa::path(get, path = "/api/v1/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "Sessions", body = [SessionView]),
        (status = 401, description = "No valid access token", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn sessions(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
) -> Result<JsonResponse<Vec<SessionView>>, ApiError> {
    let sessions = state.identity().sessions(&who).await?;
    Ok(JsonResponse(
        sessions
            .into_iter()
            .map(|s| SessionView {
                id: s.id.to_string(),
                current: s.id == who.session_id,
                user_agent: s.user_agent,
                ip: s.ip,
                created_at: s.created_at,
                last_used_at: s.last_used_at,
                expires_at: s.expires_at,
            })
            .collect(),
    ))
}

/// Ends one of the caller's sessions (another device, say).
#[utoipa::path(delete, path = "/api/v1/auth/sessions/{id}", tag = "auth",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such session of yours", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn revoke_session(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("session"))?;
    state.identity().revoke_own_session(&who, id, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The public keys that verify access tokens (RFC 7517).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "JSON Web Key Set", body = Object)))]
pub(crate) async fn jwks(State(state): State<AppState>) -> JsonResponse<serde_json::Value> {
    JsonResponse(state.identity().keys().jwks())
}

/// A mailed verification token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenBody {
    /// The token from the mail.
    token: String,
}

/// Verifies the email address with the token mailed at registration.
#[utoipa::path(post, path = "/api/v1/auth/verify-email", tag = "auth", request_body = TokenBody,
    responses(
        (status = 204, description = "Verified"),
        (status = 400, description = "Unknown, used or expired token", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn verify_email(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<TokenBody>,
) -> Result<StatusCode, ApiError> {
    state.identity().verify_email(&body.token, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Mails the caller a new verification token (nothing happens if they are verified).
#[utoipa::path(post, path = "/api/v1/auth/verify-email/request", tag = "auth",
    security(("bearer" = [])),
    responses((status = 202, description = "Mailed if not yet verified")))]
pub(crate) async fn request_verification(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
) -> Result<StatusCode, ApiError> {
    state.identity().request_verification(&who, &ctx).await?;
    Ok(StatusCode::ACCEPTED)
}

/// The current password and a new one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordChangeBody {
    /// The password now.
    current_password: String,
    /// The password from now on; the policy applies.
    #[schema(min_length = 8, max_length = 256)]
    new_password: String,
}

/// Changes the caller's password and ends every other session.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", security(("bearer" = [])),
    request_body = PasswordChangeBody,
    responses(
        (status = 204, description = "Changed"),
        (status = 422, description = "Wrong current password, or the new one breaks the policy",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn change_password(
    State(state): State<AppState>,
    Auth(who, ..): Auth,
    Ctx(ctx): Ctx,
    Json(body): Json<PasswordChangeBody>,
) -> Result<StatusCode, ApiError> {
    state
        .identity()
        .change_password(&who, &body.current_password, &body.new_password, &ctx)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The account to reset.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetRequestBody {
    /// The account's email.
    email: String,
}

/// Mails a password-reset token if the email has an account; the answer is 202 for any email
/// address, known or not.
#[utoipa::path(post, path = "/api/v1/auth/password-reset", tag = "auth",
    request_body = ResetRequestBody,
    responses(
        (status = 202, description = "Mailed if the account exists"),
        (status = 422, description = "The email is not an email address", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn request_password_reset(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<ResetRequestBody>,
) -> Result<StatusCode, ApiError> {
    state
        .identity()
        .request_password_reset(&body.email, &ctx)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

/// A reset token and the new password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetConfirmBody {
    /// The token from the mail.
    token: String,
    /// The new password; the policy applies.
    #[schema(min_length = 8, max_length = 256)]
    new_password: String,
}

/// Sets a new password with a mailed token and ends every session.
#[utoipa::path(post, path = "/api/v1/auth/password-reset/confirm", tag = "auth",
    request_body = ResetConfirmBody,
    responses(
        (status = 204, description = "Password set"),
        (status = 400, description = "Unknown, used or expired token", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "The new password breaks the policy", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn confirm_password_reset(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<ResetConfirmBody>,
) -> Result<StatusCode, ApiError> {
    state
        .identity()
        .confirm_password_reset(&body.token, &body.new_password, &ctx)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
