//! Nothing to link: this crate's tests (`tests/tidy.rs`) read `cargo metadata` and the
//! repository's files, and fail when a crate depends on what its layer must not know.
