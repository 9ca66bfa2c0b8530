//! The gateway's Prometheus metrics, registered by the server in its registry.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of `ws_frames_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    /// `in` or `out`.
    pub direction: &'static str,
    /// The frame's `type`.
    pub r#type: &'static str,
}

/// Labels of `ws_connections`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `user` (devices come later).
    pub kind: &'static str,
}

/// Labels of `ws_disconnects_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The close code.
    pub code: u16,
}

/// Labels of `ws_rate_limited_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    /// `ip`, `user` or `connection`.
    pub scope: &'static str,
}

/// The gateway's metrics; cloning shares them.
#[derive(Debug, Clone)]
pub struct WsMetrics {
    /// Open connections by kind.
    pub connections: Family<KindLabel, Gauge<i64, AtomicI64>>,
    /// Frames by direction and type.
    pub frames: Family<FrameLabels, Counter>,
    /// Closes by code.
    pub disconnects: Family<CodeLabel, Counter>,
    /// Refusals by rate limit scope.
    pub rate_limited: Family<ScopeLabel, Counter>,
    /// Seconds from receiving a `send` to queueing its broadcast.
    pub delivery: Histogram,
}

impl Default for WsMetrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            frames: Family::default(),
            disconnects: Family::default(),
            rate_limited: Family::default(),
            delivery: duration_histogram(),
        }
    }
}

impl WsMetrics {
    /// Counts a frame.
    pub fn frame(&self, direction: &'static str, kind: &'static str) {
        self.frames
            .get_or_create(&FrameLabels {
                direction,
                r#type: kind,
            })
            .inc();
    }

    /// Counts a refusal.
    pub fn limited(&self, scope: &'static str) {
        self.rate_limited.get_or_create(&ScopeLabel { scope }).inc();
    }

    /// Adds these metrics to a registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ws_connections",
            "Open WebSocket connections, by kind",
            self.connections.clone(),
        );
        registry.register(
            "ws_frames",
            "WebSocket frames, by direction and type",
            self.frames.clone(),
        );
        registry.register(
            "ws_disconnects",
            "WebSocket closes, by close code",
            self.disconnects.clone(),
        );
        registry.register(
            "ws_rate_limited",
            "WebSocket connections and frames refused by a rate limit, by scope",
            self.rate_limited.clone(),
        );
        registry.register_with_unit(
            "ws_delivery",
            "Time from receiving a send to queueing its broadcast",
            prometheus_client::registry::Unit::Seconds,
            self.delivery.clone(),
        );
    }
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~16 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}
