//! Prometheus metrics: one registry per server, rendered at `/metrics`.
//!
//! Each server owns its registry (no global recorder), so tests that run several servers in
//! one process see only their own counts.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use unhidra_chat::metrics::WsMetrics;
use unhidra_identity::metrics::AuthMetrics;
use unhidra_jobs::JobsMetrics;

use crate::build_info::BuildInfo;

/// The content type of the exposition format written by [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of `http_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The route template (`/api/v1/rooms/{id}`), never the raw path, so that cardinality stays
    /// bounded; `unmatched` for requests that matched no route.
    pub route: String,
    /// The response status.
    pub status: u16,
}

/// Labels of `http_request_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// The route template.
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric the server records.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by method, route and status.
    pub http_requests: Family<RequestLabels, Counter>,
    /// Time to answer, by method and route.
    pub http_duration: HistogramFamily,
    /// Requests being answered now.
    pub http_in_flight: Gauge<i64, AtomicI64>,
    /// Identity's counters.
    pub auth: AuthMetrics,
    /// The gateway's metrics.
    pub ws: WsMetrics,
    /// The job system's metrics.
    pub jobs: JobsMetrics,
    /// The device fleet's.
    pub devices: unhidra_devices::DeviceMetrics,
    /// Over-the-air updates'.
    pub ota: unhidra_ota::OtaMetrics,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~16 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

impl Metrics {
    /// A registry with the HTTP metrics and `unhidra_build_info`.
    pub fn new(build: &BuildInfo) -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "http_request_duration",
            "Time from receiving a request to answering it, by route template",
            prometheus_client::registry::Unit::Seconds,
            http_duration.clone(),
        );
        let http_in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being answered now",
            http_in_flight.clone(),
        );
        registry.register(
            "unhidra_build",
            "Version and build of the running server",
            Info::new(vec![
                ("version", build.version.to_owned()),
                ("commit", build.commit.to_owned()),
                ("rustc", build.rustc.to_owned()),
                ("target", build.target.to_owned()),
            ]),
        );
        let auth = AuthMetrics::default();
        auth.register(&mut registry);
        let ws = WsMetrics::default();
        ws.register(&mut registry);
        let jobs = JobsMetrics::default();
        jobs.register(&mut registry);
        let devices = unhidra_devices::DeviceMetrics::default();
        devices.register(&mut registry);
        let ota = unhidra_ota::OtaMetrics::default();
        ota.register(&mut registry);
        Self {
            registry,
            http_requests,
            http_duration,
            http_in_flight,
            auth,
            ws,
            jobs,
            devices,
            ota,
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                method: method.to_owned(),
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    /// The registry, for capabilities that register metrics of their own at start.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every metric in the OpenMetrics text format, which Prometheus scrapes natively.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts a request in flight for as long as it lives, even if the handler panics.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a Gauge<i64, AtomicI64>);

impl<'a> InFlight<'a> {
    pub(crate) fn start(gauge: &'a Gauge<i64, AtomicI64>) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Requests being answered now.
pub fn in_flight(metrics: &Metrics) -> i64 {
    metrics.http_in_flight.inner().load(Ordering::Relaxed)
}
