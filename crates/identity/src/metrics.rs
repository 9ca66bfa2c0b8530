//! The identity service's Prometheus metrics, registered by the server in its registry.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `auth_logins_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Labels of `auth_failures_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why: `wrong_password`, `unknown_email`, `locked`, `disabled`, `refresh_reused`, …
    pub reason: &'static str,
}

/// Labels of `auth_rate_limited_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// The limited operation: `login`, `register`, `refresh`, …
    pub route: &'static str,
}

/// The identity service's counters; cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct AuthMetrics {
    /// Logins by result.
    pub logins: Family<ResultLabel, Counter>,
    /// Authentication failures by reason.
    pub failures: Family<ReasonLabel, Counter>,
    /// Requests refused by a rate limit, by operation.
    pub rate_limited: Family<LimitLabel, Counter>,
    /// Accounts that may log in, as of the last scrape.
    pub active_users: Gauge<i64, AtomicI64>,
}

impl AuthMetrics {
    /// Counts a failure of `reason`.
    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a login result.
    pub fn login(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.logins.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a refusal by the rate limit of `route`.
    pub fn limited(&self, route: &'static str) {
        self.rate_limited.get_or_create(&LimitLabel { route }).inc();
    }

    /// Adds these metrics to a registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("auth_logins", "Logins, by result", self.logins.clone());
        registry.register(
            "auth_failures",
            "Authentication failures, by reason",
            self.failures.clone(),
        );
        registry.register(
            "auth_rate_limited",
            "Requests refused by a rate limit, by operation",
            self.rate_limited.clone(),
        );
        registry.register(
            "active_users",
            "Accounts that may log in",
            self.active_users.clone(),
        );
    }
}
