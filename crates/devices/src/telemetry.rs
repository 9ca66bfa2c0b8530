//! Telemetry: batches checked against the limits, written by one task that gathers the batches
//! of every device waiting at that moment into one transaction (one commit for many devices),
//! each answered only once that transaction committed; reads of ranges and buckets; and
//! retention as a job.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use unhidra_config::Config;
use unhidra_core::UserId;
use unhidra_core::{Clock, SlidingWindow};
use unhidra_jobs::{Handler, JobContext, JobError};
use unhidra_protocol::device::{Point, Value, valid_telemetry_key};
use unhidra_store::devices::{
    Aggregate, Appended, TelemetryBatch, TelemetryBucket, TelemetryBudget, TelemetryPoint,
    TelemetryRange, TelemetryValue,
};
use unhidra_store::{Store, StoreError};
use uuid::Uuid;

use crate::{DeviceError, DeviceMetrics};

/// The job kind of telemetry retention.
pub const RETENTION_KIND: &str = "devices.telemetry_retention";

/// Batches one store write gathers at most.
const WRITE_BATCHES: usize = 512;
/// Points one store write gathers at most (a batch is never split).
const WRITE_POINTS: usize = 50_000;
/// Batches waiting for the writer at most; a device past it waits for room.
const QUEUE: usize = 4096;
/// Points per telemetry page when none is asked for, and at most.
pub const DEFAULT_READ: u32 = 500;
/// The largest page or number of buckets.
pub const MAX_READ: u32 = 5000;

/// What a device may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Points per batch.
    pub max_points: usize,
    /// Distinct keys per device.
    pub max_keys: usize,
    /// Bytes of one value (a string, an array's packed data).
    pub max_value_bytes: usize,
    /// Batches per minute per device.
    pub batches_per_minute: u32,
    /// Bytes stored per device and day (UTC); 0: no limit.
    pub bytes_per_day: u64,
    /// Bytes stored per owner (all their devices) and day (UTC); 0: no limit.
    pub bytes_per_owner_per_day: u64,
    /// How far ahead of the server's clock a point's time may be.
    pub max_future: Duration,
    /// How long points are kept; a point older than this is refused.
    pub retention: Duration,
}

impl Limits {
    /// The limits the configuration gives.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let duration = |name: &str, d: std::time::Duration| {
            Duration::from_std(d).map_err(|e| format!("{name}: {e}"))
        };
        Ok(Self {
            max_points: usize::try_from(config.telemetry_max_points).unwrap_or(usize::MAX),
            max_keys: usize::try_from(config.telemetry_max_keys).unwrap_or(usize::MAX),
            max_value_bytes: usize::try_from(config.telemetry_max_value_bytes)
                .unwrap_or(usize::MAX),
            batches_per_minute: config.telemetry_batches_per_minute,
            bytes_per_day: config.telemetry_bytes_per_day,
            bytes_per_owner_per_day: config.telemetry_bytes_per_owner_per_day,
            max_future: duration("telemetry_max_future", config.telemetry_max_future.0)?,
            retention: duration("telemetry_retention", config.telemetry_retention.0)?,
        })
    }
}

type Reply = oneshot::Sender<Result<Appended, DeviceError>>;

/// The write path: limits, then the writer task.
#[derive(Debug)]
pub(crate) struct Ingest {
    store: Arc<dyn Store>,
    limits: Limits,
    metrics: DeviceMetrics,
    queue: mpsc::Sender<(TelemetryBatch, Reply)>,
    rate: SlidingWindow,
    /// The keys each device has stored, learnt at its first batch.
    keys: Mutex<HashMap<Uuid, HashSet<String>>>,
}

/// What a point costs against a device's daily budget: its key and value, and 24 bytes for its
/// device, time and row.
const POINT_OVERHEAD: u64 = 24;

/// The day of `now`, since 1970 (UTC), and the seconds until the next one.
fn day_of(now: DateTime<Utc>) -> (i64, i64) {
    let secs = now.timestamp();
    (secs.div_euclid(86_400), 86_400 - secs.rem_euclid(86_400))
}

fn invalid(field: &'static str, code: &'static str, message: String) -> DeviceError {
    DeviceError::Invalid(field, code, message)
}

impl Ingest {
    /// The write path, with its writer task started.
    pub(crate) fn start(store: Arc<dyn Store>, limits: Limits, metrics: DeviceMetrics) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let budget = TelemetryBudget {
            per_device: limits.bytes_per_day,
            per_owner: limits.bytes_per_owner_per_day,
        };
        tokio::spawn(writer(Arc::clone(&store), rx, metrics.clone(), budget));
        Self {
            rate: SlidingWindow::new(limits.batches_per_minute, Duration::minutes(1)),
            store,
            limits,
            metrics,
            queue,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, HashSet<String>>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn forget(&self, device: Uuid) {
        self.keys().remove(&device);
    }

    /// Checks a batch, and stores it; answers once it is durable.
    pub(crate) async fn submit(
        &self,
        device: Uuid,
        owner: Option<UserId>,
        seq: u64,
        points: Vec<Point>,
        now: DateTime<Utc>,
    ) -> Result<bool, DeviceError> {
        let result = self.check_and_store(device, owner, seq, points, now).await;
        let outcome = match &result {
            Ok(true) => "stored",
            Ok(false) => "duplicate",
            Err(DeviceError::Store(_)) => "failed",
            Err(_) => "refused",
        };
        self.metrics.batch(outcome);
        result
    }

    async fn check_and_store(
        &self,
        device: Uuid,
        owner: Option<UserId>,
        seq: u64,
        points: Vec<Point>,
        now: DateTime<Utc>,
    ) -> Result<bool, DeviceError> {
        let seq = i64::try_from(seq)
            .map_err(|_| invalid("seq", "out_of_range", "seq is at most 2^63 - 1".into()))?;
        let limits = &self.limits;
        if points.len() > limits.max_points {
            return Err(invalid(
                "points",
                "invalid_length",
                format!(
                    "a batch has at most {} points (telemetry_max_points)",
                    limits.max_points
                ),
            ));
        }
        let mut stored = Vec::with_capacity(points.len());
        let mut cost = 0u64;
        for (i, p) in points.into_iter().enumerate() {
            if !valid_telemetry_key(&p.key) {
                return Err(invalid(
                    "points",
                    "invalid_key",
                    format!(
                        "point {i}: a key is 1 to 64 of A-Z a-z 0-9 _ . : / -, starting with a letter or digit"
                    ),
                ));
            }
            if p.value.byte_len() > limits.max_value_bytes {
                return Err(invalid(
                    "points",
                    "invalid_length",
                    format!(
                        "point {i}: a value has at most {} bytes (telemetry_max_value_bytes)",
                        limits.max_value_bytes
                    ),
                ));
            }
            if let Value::Text(text) = &p.value
                && unhidra_core::forbidden_control(text, unhidra_core::Controls::LineBreaks)
                    .is_some()
            {
                return Err(invalid(
                    "points",
                    "invalid_value",
                    format!("point {i}: text has no control characters but tab and line breaks"),
                ));
            }
            let ts = match p.ts {
                None => now,
                Some(ms) => DateTime::from_timestamp_millis(ms).ok_or_else(|| {
                    invalid(
                        "points",
                        "invalid_ts",
                        format!("point {i}: ts is out of range"),
                    )
                })?,
            };
            if ts > now + limits.max_future {
                return Err(invalid(
                    "points",
                    "ts_in_future",
                    format!(
                        "point {i}: ts is more than {} s ahead of the server's clock",
                        limits.max_future.num_seconds()
                    ),
                ));
            }
            if ts < now - limits.retention {
                return Err(invalid(
                    "points",
                    "ts_too_old",
                    format!(
                        "point {i}: ts is older than the retention of {} s (is the device's clock set?)",
                        limits.retention.num_seconds()
                    ),
                ));
            }
            cost += POINT_OVERHEAD
                + u64::try_from(p.key.len() + p.value.byte_len()).unwrap_or(u64::MAX);
            stored.push(TelemetryPoint {
                key: p.key,
                ts,
                value: stored_value(p.value),
            });
        }
        self.check_keys(device, &stored).await?;
        self.rate
            .try_acquire(&device.to_string(), now)
            .map_err(|retry_after| {
                self.metrics.limited("telemetry");
                DeviceError::RateLimited {
                    scope: "telemetry",
                    retry_after,
                }
            })?;
        let new_keys: Vec<String> = stored.iter().map(|p| p.key.clone()).collect();
        let batch = TelemetryBatch {
            device_id: device,
            seq,
            received_at: now,
            points: stored,
            owner,
            cost,
        };
        let (tx, rx) = oneshot::channel();
        if self.queue.send((batch, tx)).await.is_err() {
            return Err(unavailable("the telemetry writer has stopped"));
        }
        // The budgets are reserved with the write, in the store, so that they hold across
        // nodes and for batches written at once; a batch stored before is acknowledged again,
        // over a budget or not.
        let over = |scope| {
            self.metrics.limited("telemetry_bytes");
            Err(DeviceError::RateLimited {
                scope,
                retry_after: day_of(now).1,
            })
        };
        match rx
            .await
            .map_err(|_| unavailable("the telemetry writer has stopped"))??
        {
            Appended::Stored => {
                if let Some(keys) = self.keys().get_mut(&device) {
                    keys.extend(new_keys);
                }
                Ok(true)
            }
            Appended::Repeat => Ok(false),
            Appended::OverDeviceBudget => over("telemetry bytes today (telemetry_bytes_per_day)"),
            Appended::OverOwnerBudget => over(
                "telemetry bytes of the owner's devices today (telemetry_bytes_per_owner_per_day)",
            ),
        }
    }

    /// Refuses a batch that would take a device past its number of keys.
    async fn check_keys(&self, device: Uuid, points: &[TelemetryPoint]) -> Result<(), DeviceError> {
        let known = self.keys().contains_key(&device);
        if !known {
            let stored: HashSet<String> = self
                .store
                .telemetry_latest(device)
                .await?
                .into_iter()
                .map(|p| p.key)
                .collect();
            self.keys().entry(device).or_insert(stored);
        }
        let keys = self.keys();
        let have = keys.get(&device).map_or(0, HashSet::len);
        let fresh: HashSet<&str> = points
            .iter()
            .map(|p| p.key.as_str())
            .filter(|k| !keys.get(&device).is_some_and(|s| s.contains(*k)))
            .collect();
        if have + fresh.len() > self.limits.max_keys {
            return Err(invalid(
                "points",
                "too_many_keys",
                format!(
                    "a device has at most {} telemetry keys (telemetry_max_keys)",
                    self.limits.max_keys
                ),
            ));
        }
        Ok(())
    }
}

fn unavailable(why: &str) -> DeviceError {
    DeviceError::Store(StoreError::Unavailable(why.to_owned().into()))
}

/// A value as the store keeps it: arrays as `dtype:AxB` and their packed data.
fn stored_value(value: Value) -> TelemetryValue {
    match value {
        Value::Number(n) => TelemetryValue::Number(n),
        Value::Bool(b) => TelemetryValue::Bool(b),
        Value::Text(t) => TelemetryValue::Text(t),
        Value::Array(a) => {
            let dims: Vec<String> = a.shape().iter().map(u32::to_string).collect();
            TelemetryValue::Array {
                shape: format!("{}:{}", a.dtype().as_str(), dims.join("x")),
                data: a.data().to_vec(),
            }
        }
    }
}

/// The one task that writes telemetry: it takes every batch waiting (up to a bound), writes
/// them in one transaction, then answers each.
async fn writer(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<(TelemetryBatch, Reply)>,
    metrics: DeviceMetrics,
    budget: TelemetryBudget,
) {
    let mut batches = Vec::new();
    let mut replies = Vec::new();
    while let Some((batch, reply)) = rx.recv().await {
        let mut points = batch.points.len();
        batches.push(batch);
        replies.push(reply);
        while batches.len() < WRITE_BATCHES && points < WRITE_POINTS {
            match rx.try_recv() {
                Ok((batch, reply)) => {
                    points += batch.points.len();
                    batches.push(batch);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        #[allow(clippy::cast_precision_loss, reason = "a count of batches")]
        metrics.write_batches.observe(batches.len() as f64);
        match store.append_telemetry(&batches, &budget).await {
            Ok(stored) => {
                let new_points: usize = batches
                    .iter()
                    .zip(&stored)
                    .filter(|(_, s)| **s == Appended::Stored)
                    .map(|(b, _)| b.points.len())
                    .sum();
                metrics
                    .points
                    .inc_by(u64::try_from(new_points).unwrap_or(u64::MAX));
                for (reply, stored) in replies.drain(..).zip(stored) {
                    let _ = reply.send(Ok(stored));
                }
            }
            // One bad batch must not fail the others it was grouped with: each is tried alone.
            Err(e) if batches.len() > 1 => {
                tracing::warn!(batches = batches.len(), error = %unhidra_core::error_chain(&e), "telemetry group not stored; storing its batches one by one");
                for (batch, reply) in batches.drain(..).zip(replies.drain(..)) {
                    let points = batch.points.len();
                    let one = store
                        .append_telemetry(std::slice::from_ref(&batch), &budget)
                        .await;
                    let _ = reply.send(match one {
                        Ok(stored) => {
                            let stored = stored.first().copied().unwrap_or(Appended::Repeat);
                            if stored == Appended::Stored {
                                metrics.points.inc_by(u64::try_from(points).unwrap_or(u64::MAX));
                            }
                            Ok(stored)
                        }
                        Err(e) => {
                            tracing::warn!(device = %batch.device_id, seq = batch.seq, error = %unhidra_core::error_chain(&e), "telemetry batch not stored");
                            Err(unavailable(&e.to_string()))
                        }
                    });
                }
            }
            Err(e) => {
                tracing::warn!(batches = batches.len(), error = %unhidra_core::error_chain(&e), "telemetry not stored");
                let why = e.to_string();
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(unavailable(&why)));
                }
            }
        }
        batches.clear();
    }
}

/// A stored point as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = TelemetryPointView)]
pub struct PointView {
    /// The key.
    pub key: String,
    /// When it was measured.
    pub ts: DateTime<Utc>,
    /// A number, a bool, a string, or an array `{dtype, shape, data}`.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
}

impl From<TelemetryPoint> for PointView {
    fn from(p: TelemetryPoint) -> Self {
        let value = match p.value {
            TelemetryValue::Number(n) => serde_json::json!(n),
            TelemetryValue::Bool(b) => serde_json::json!(b),
            TelemetryValue::Text(t) => serde_json::json!(t),
            TelemetryValue::Array { shape, data } => array_json(&shape, &data),
        };
        Self {
            key: p.key,
            ts: p.ts,
            value,
        }
    }
}

/// `{dtype, shape, data}` from the stored `dtype:AxB` and packed little-endian values.
fn array_json(shape: &str, data: &[u8]) -> serde_json::Value {
    let (dtype, dims) = shape.split_once(':').unwrap_or(("f32", ""));
    let dims: Vec<u32> = dims.split('x').filter_map(|d| d.parse().ok()).collect();
    let values: Vec<serde_json::Value> = match dtype {
        "i16" => data
            .chunks_exact(2)
            .map(|c| serde_json::json!(i16::from_le_bytes([c[0], c[1]])))
            .collect(),
        "u16" => data
            .chunks_exact(2)
            .map(|c| serde_json::json!(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|c| serde_json::json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    serde_json::json!({ "dtype": dtype, "shape": dims, "data": values })
}

/// How the numbers of a bucket are summed up, as the API spells it.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[schema(as = TelemetryAggregate)]
#[serde(rename_all = "lowercase")]
pub enum Agg {
    /// The mean.
    Avg,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// How many points.
    Count,
}

/// A read of stored telemetry.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// The key.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")]
    pub key: String,
    /// Measured at or after this time (RFC 3339).
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// Measured before this time (RFC 3339).
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// Points (or buckets) at most: 1 to 5000, default 500.
    #[serde(default)]
    #[param(minimum = 1, maximum = 5000)]
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Buckets instead of points: `30s`, `1m`, `5m`, `1h`, `1d` (any count of s, m, h or d
    /// from 1 s to 31 d).
    #[serde(default)]
    #[param(pattern = "^[1-9][0-9]{0,6}[smhd]$")]
    pub bucket: Option<String>,
    /// With `bucket`: `avg` (default), `min`, `max` or `count`.
    #[serde(default)]
    #[param(inline)]
    pub agg: Option<Agg>,
}

/// One bucket of an aggregate read.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = TelemetryBucketView)]
pub struct BucketView {
    /// The bucket's start.
    pub start: DateTime<Utc>,
    /// The aggregate.
    pub value: f64,
}

/// What a read answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = TelemetryRead)]
pub struct Read {
    /// The key.
    pub key: String,
    /// The points, oldest first (a read without `bucket`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<PointView>>,
    /// The buckets, oldest first (a read with `bucket`); empty buckets are left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<BucketView>>,
    /// The cursor of the next page, when this one is full.
    pub next: Option<String>,
}

/// Seconds of a bucket such as `5m`.
fn bucket_secs(text: &str) -> Option<i64> {
    let (count, unit) = text.split_at(text.len().checked_sub(1)?);
    let count: i64 = count.parse().ok().filter(|c| *c > 0)?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(count.checked_mul(unit)?).filter(|s| *s <= 31 * 86_400)
}

/// Reads one key's points or buckets.
pub(crate) async fn read(
    store: &dyn Store,
    device: Uuid,
    query: ReadQuery,
) -> Result<Read, DeviceError> {
    if !valid_telemetry_key(&query.key) {
        return Err(invalid("key", "invalid_key", "not a telemetry key".into()));
    }
    let limit = query.limit.unwrap_or(DEFAULT_READ);
    if !(1..=MAX_READ).contains(&limit) {
        return Err(invalid(
            "limit",
            "out_of_range",
            format!("limit is from 1 to {MAX_READ}"),
        ));
    }
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(|| {
                    invalid(
                        "cursor",
                        "invalid_cursor",
                        "not a cursor of this API".into(),
                    )
                })
        })
        .transpose()?;
    let range = TelemetryRange {
        device_id: device,
        key: query.key.clone(),
        from: query.from,
        to: query.to,
        after,
        limit,
    };
    if let Some(bucket) = query.bucket.as_deref() {
        let secs = bucket_secs(bucket).ok_or_else(|| {
            invalid(
                "bucket",
                "invalid_bucket",
                "a bucket is a count of s, m, h or d, from 1s to 31d".into(),
            )
        })?;
        let aggregate = match query.agg.unwrap_or(Agg::Avg) {
            Agg::Avg => Aggregate::Avg,
            Agg::Min => Aggregate::Min,
            Agg::Max => Aggregate::Max,
            Agg::Count => Aggregate::Count,
        };
        let buckets: Vec<TelemetryBucket> =
            store.telemetry_buckets(&range, secs, aggregate).await?;
        return Ok(Read {
            key: query.key,
            points: None,
            buckets: Some(
                buckets
                    .into_iter()
                    .map(|b| BucketView {
                        start: b.start,
                        value: b.value,
                    })
                    .collect(),
            ),
            next: None,
        });
    }
    let points = store.telemetry(&range).await?;
    let full = points.len() == usize::try_from(limit).unwrap_or(usize::MAX);
    let next = full
        .then(|| points.last().map(|p| p.ts.timestamp_micros().to_string()))
        .flatten();
    Ok(Read {
        key: query.key,
        points: Some(points.into_iter().map(PointView::from).collect()),
        buckets: None,
        next,
    })
}

/// Telemetry retention as a job: points measured longer ago than `telemetry_retention` are
/// deleted, in rounds so that no statement holds the table long.
#[derive(Debug)]
pub struct Retention {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    keep: Duration,
}

impl Retention {
    /// The handler over a store.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, keep: Duration) -> Self {
        Self { store, clock, keep }
    }
}

/// Points deleted per round.
const PRUNE_ROUND: u32 = 10_000;

#[async_trait]
impl Handler for Retention {
    async fn run(&self, job: &JobContext) -> Result<(), JobError> {
        let before = self.clock.now() - self.keep;
        let mut deleted = 0;
        loop {
            let n = self
                .store
                .prune_telemetry(before, PRUNE_ROUND)
                .await
                .map_err(|e| JobError::retry(unhidra_core::error_chain(&e)))?;
            deleted += n;
            if n < u64::from(PRUNE_ROUND) || job.is_cancelled() {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "telemetry retention applied");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_parsed() {
        assert_eq!(bucket_secs("30s"), Some(30));
        assert_eq!(bucket_secs("5m"), Some(300));
        assert_eq!(bucket_secs("1h"), Some(3600));
        assert_eq!(bucket_secs("31d"), Some(31 * 86_400));
        for bad in [
            "",
            "m",
            "0m",
            "-1m",
            "1w",
            "32d",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert_eq!(bucket_secs(bad), None, "{bad}");
        }
    }

    #[test]
    fn arrays_come_back_as_numbers() {
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            array_json("f32:1x2", &data),
            serde_json::json!({ "dtype": "f32", "shape": [1, 2], "data": [1.5, -2.0] })
        );
        let data: Vec<u8> = [300u16, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            array_json("u16:2", &data)["data"],
            serde_json::json!([300, 7])
        );
    }
}
