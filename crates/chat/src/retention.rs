//! Room retention as a background job: every `retention_interval`, once across every node, the
//! messages past each room's `retention_max_age` or `retention_max_count` are deleted.

use std::sync::Arc;

use async_trait::async_trait;
use unhidra_core::Clock;
use unhidra_jobs::{Handler, JobContext, JobError};
use unhidra_store::Store;

/// The job kind.
pub const KIND: &str = "rooms.retention";

/// Applies every room's retention.
#[derive(Debug)]
pub struct RetentionJob {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl RetentionJob {
    pub(crate) fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }
}

#[async_trait]
impl Handler for RetentionJob {
    async fn run(&self, _: &JobContext) -> Result<(), JobError> {
        let now = crate::stored_now(&*self.clock);
        match self.store.apply_retention(now).await {
            Ok(0) => Ok(()),
            Ok(deleted) => {
                tracing::info!(deleted, "retention applied");
                Ok(())
            }
            Err(e) => Err(JobError::retry(unhidra_core::error_chain(&e))),
        }
    }
}
