//! What this binary is: version, commit, compiler and target, recorded at build time.

use serde::Serialize;

/// Facts about the build, for `spec`, logs and `unhidra_build_info`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BuildInfo {
    /// The crate version.
    pub version: &'static str,
    /// The git commit built from, or `unknown`.
    pub commit: &'static str,
    /// The compiler's `--version`.
    pub rustc: &'static str,
    /// The target triple.
    pub target: &'static str,
    /// `debug` or `release`.
    pub profile: &'static str,
}

/// This binary's build.
pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("UNHIDRA_BUILD_COMMIT"),
    rustc: env!("UNHIDRA_BUILD_RUSTC"),
    target: env!("UNHIDRA_BUILD_TARGET"),
    profile: env!("UNHIDRA_BUILD_PROFILE"),
};
