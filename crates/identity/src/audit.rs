//! Recording security events: in the store and, when configured, in the audit file. Shared
//! (behind an `Arc`) with work that runs after an answer, such as a reset request's.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use unhidra_core::{Clock, UserId};
use unhidra_store::Store;
use unhidra_store::identity::NewAuditEvent;

use super::RequestContext;
use super::audit_file::{self, AuditFile};

/// Where security events go.
#[derive(Debug)]
pub(crate) struct Auditor {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) file: Option<AuditFile>,
    /// Shorten addresses in audit events.
    pub(crate) minimise: bool,
}

/// Now, in the whole microseconds that both stores keep, so that what a call returns equals
/// what a later read returns.
pub(crate) fn now_of(clock: &dyn Clock) -> DateTime<Utc> {
    let now = clock.now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

impl Auditor {
    /// Records a security event. A failure to record is logged, and never hides the outcome of
    /// the action from its caller.
    pub(crate) async fn record(
        &self,
        kind: &str,
        actor: Option<UserId>,
        subject: Option<String>,
        ctx: &RequestContext,
        detail: serde_json::Value,
    ) {
        let ip = ctx.ip.as_deref().map(|ip| {
            if self.minimise {
                audit_file::minimise_ip(ip)
            } else {
                ip.to_owned()
            }
        });
        let event = NewAuditEvent {
            at: now_of(&*self.clock),
            kind: kind.to_owned(),
            actor_id: actor,
            subject_id: subject,
            ip,
            trace_id: ctx.trace_id.clone(),
            detail: detail.to_string(),
        };
        let id = match self.store.append_audit(&event).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::error!(kind, error = %unhidra_core::error_chain(&e), "audit event not recorded");
                None
            }
        };
        if let Some(sink) = &self.file {
            sink.write(&serde_json::json!({
                "id": id,
                "at": event.at,
                "kind": event.kind,
                "actor_id": event.actor_id.map(|u| u.to_string()),
                "subject_id": event.subject_id,
                "ip": event.ip,
                "trace_id": event.trace_id,
                "detail": detail,
            }));
        }
    }
}
