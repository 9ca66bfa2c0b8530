//! Every route, and the OpenAPI document generated from them.

mod admin;
mod auth;
mod deployments;
mod devices;
mod docs;
mod files;
mod firmware;
mod health;
mod jobs;
mod metrics;
mod rooms;

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{FieldError, Problem};
use crate::state::AppState;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Unhidra",
        description = "A secure, self-hosted real-time backend for people and their devices. \
            Every error is an RFC 9457 problem (`application/problem+json`).",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    components(schemas(Problem, FieldError)),

    tags(
        (name = "operations", description = "Health, readiness, metrics and this document."),
        (name = "auth", description = "Accounts, tokens and sessions."),
        (name = "admin", description = "User management and the audit log; admins only."),
        (name = "jobs", description = "Background jobs: a job with its attempts, listings, \
            counts, retries, cancellations and dead letters, and the cron schedules that \
            enqueue jobs; admins only."),
        (name = "devices", description = "The device fleet: devices and their keys, alerts, \
            telemetry, and the fleet's summary. Devices connect to the WebSocket at /ws with \
            their key (docs/protocol.md)."),
        (name = "firmware", description = "Firmware images for over-the-air updates: uploaded \
            with a manifest signed off the server (docs/ota.md), checked, content-addressed; \
            downloaded by devices with their key or a signed link."),
        (name = "deployments", description = "Firmware rollouts to a cohort of devices in \
            stages that halt themselves past an error threshold, each device followed to its \
            confirmation after the reboot (docs/ota.md); admins only."),
        (name = "files", description = "Uploaded files: typed by their content, named \
            safely, counted against quotas, downloaded by access with ranges and entity tags \
            (docs/media.md)."),
        (name = "rooms", description = "Rooms, members, messages and presence. Realtime delivery \
            is the WebSocket at /ws (docs/protocol.md)."),
    ),
)]
struct ApiDoc;

/// Gives every operation a `default` response: any status not listed is a problem document
/// (400 malformed JSON, 413, 415, 429, 500 and so on can come from any operation).
struct ProblemDefault;

impl utoipa::Modify for ProblemDefault {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let problem = ResponseBuilder::new()
            .description("An error, as an RFC 9457 problem document")
            .content(
                crate::error::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                operation
                    .responses
                    .responses
                    .entry("default".to_owned())
                    .or_insert_with(|| problem.clone().into());
            }
        }
    }
}

/// Declares the `bearer` scheme that authenticated operations name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("unh_dk_ device key")
                    .build(),
            ),
        );
    }
}

/// The documented routes and the document describing them.
fn documented() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::Modify;
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .routes(routes!(metrics::metrics))
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::login_mfa))
        .routes(routes!(auth::totp_setup))
        .routes(routes!(auth::totp_enable))
        .routes(routes!(auth::totp_disable))
        .routes(routes!(auth::reauthenticate))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::me))
        .routes(routes!(auth::sessions))
        .routes(routes!(auth::revoke_session))
        .routes(routes!(auth::jwks))
        .routes(routes!(auth::verify_email))
        .routes(routes!(auth::request_verification))
        .routes(routes!(auth::change_password))
        .routes(routes!(auth::request_password_reset))
        .routes(routes!(auth::confirm_password_reset))
        .routes(routes!(admin::list_users))
        .routes(routes!(admin::update_user))
        .routes(routes!(admin::bulk))
        .routes(routes!(admin::logs))
        .routes(routes!(admin::keys))
        .routes(routes!(admin::rotate_key))
        .routes(routes!(admin::retire_key))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::stats))
        .routes(routes!(jobs::retry))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::requeue))
        .routes(routes!(jobs::purge))
        .routes(routes!(jobs::cron_list))
        .routes(routes!(jobs::cron_put, jobs::cron_delete))
        .routes(routes!(devices::create, devices::list))
        .routes(routes!(devices::get, devices::update, devices::delete))
        .routes(routes!(devices::keys, devices::rotate))
        .routes(routes!(devices::revoke))
        .routes(routes!(devices::telemetry))
        .routes(routes!(devices::latest))
        .routes(routes!(devices::post_telemetry))
        .routes(routes!(devices::send_command, devices::list_commands))
        .routes(routes!(devices::get_command))
        .routes(routes!(devices::get_config, devices::put_config))
        .routes(routes!(devices::alerts))
        .routes(routes!(devices::acknowledge))
        .routes(routes!(devices::resolve))
        .routes(routes!(devices::fleet))
        .routes(routes!(devices::claim))
        .routes(routes!(files::upload, files::list))
        .routes(routes!(files::get, files::update, files::delete))
        .routes(routes!(files::content))
        .routes(routes!(files::create_link))
        .routes(routes!(files::my_usage))
        .routes(routes!(files::user_usage))
        .routes(routes!(files::set_quota, files::reset_quota))
        .routes(routes!(firmware::upload, firmware::list))
        .routes(routes!(firmware::get))
        .routes(routes!(firmware::retire))
        .routes(routes!(firmware::download))
        .routes(routes!(firmware::create_link))
        .routes(routes!(deployments::create, deployments::list))
        .routes(routes!(deployments::get))
        .routes(routes!(deployments::devices))
        .routes(routes!(deployments::pause))
        .routes(routes!(deployments::resume))
        .routes(routes!(deployments::cancel))
        .routes(routes!(devices::events))
        .routes(routes!(devices::create_token, devices::list_tokens))
        .routes(routes!(devices::revoke_token))
        .routes(routes!(rooms::create, rooms::list))
        .routes(routes!(rooms::get, rooms::update, rooms::delete))
        .routes(routes!(rooms::members, rooms::put_member))
        .routes(routes!(rooms::remove_member))
        .routes(routes!(rooms::join))
        .routes(routes!(rooms::leave))
        .routes(routes!(rooms::publish, rooms::history))
        .routes(routes!(rooms::presence))
        .routes(routes!(rooms::search))
        .routes(routes!(rooms::connections))
        .routes(routes!(rooms::close_connection))
        .split_for_parts();
    // Applied to the finished document: the operations exist only after the routes are added.
    BearerAuth.modify(&mut doc);
    ProblemDefault.modify(&mut doc);
    (router, doc)
}

/// The OpenAPI document of this build.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = documented().1;
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// Every route, before middleware.
pub(crate) fn router() -> Router<AppState> {
    let (api, _) = documented();
    let spec = openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned());
    api.route("/ws", get(crate::ws::upgrade))
        .route(
            OPENAPI_PATH,
            get(move || {
                let spec = spec.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        spec,
                    )
                }
            }),
        )
        .merge(docs::router())
}
