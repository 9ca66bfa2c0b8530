//! Unhidra's files: uploads streamed to a storage backend with their size capped as they
//! stream, typed by their content (never the client's `Content-Type`) and named safely,
//! counted against their owner's quota; downloads by access; usage and quotas. Knows no HTTP
//! and no SQL: the server is the HTTP side, the store's `files` module the SQL.

pub mod files;
pub mod kinds;
pub mod names;
pub mod storage;

pub use files::{
    Access, FileLink, FilePage, FileView, Files, FilesConfig, FilesError, Upload, UsageView,
};
pub use storage::{LocalStorage, Storage};
