//! The architecture's invariants, made mechanical (in the spirit of rust-analyzer's tidy
//! tests): each capability crate knows no HTTP and no SQL, `protocol` depends on no other
//! Unhidra crate, `docs/ARCHITECTURE.md` maps exactly the crates `cargo metadata` lists, and
//! every crate carries the project's licence.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Domain services: they take the store traits, a clock and their config, and return typed
/// errors. HTTP belongs to the server, SQL to the store.
const CAPABILITIES: &[&str] = &[
    "unhidra-identity",
    "unhidra-chat",
    "unhidra-mail",
    "unhidra-jobs",
    "unhidra-devices",
    "unhidra-ota",
    "unhidra-media",
];

/// Crates of the HTTP and WebSocket stack.
const HTTP: &[&str] = &[
    "axum",
    "axum-core",
    "hyper",
    "hyper-util",
    "http",
    "http-body",
    "tower",
    "tower-http",
    "utoipa-axum",
    "tungstenite",
    "tokio-tungstenite",
];

/// Crates that speak SQL.
const SQL: &[&str] = &[
    "sqlx",
    "sqlx-core",
    "sqlx-sqlite",
    "sqlx-postgres",
    "libsqlite3-sys",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// `cargo metadata` of the workspace, with the resolved graph.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

struct Graph {
    /// Package id → name.
    names: BTreeMap<String, String>,
    /// Package name (workspace members only) → package id.
    members: BTreeMap<String, String>,
    /// Package id → ids of its normal (not dev, not build) dependencies.
    normal: BTreeMap<String, Vec<String>>,
}

impl Graph {
    fn read() -> Self {
        let meta = metadata();
        let names: BTreeMap<String, String> = meta["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (str_of(&p["id"]), str_of(&p["name"])))
            .collect();
        let members = meta["workspace_members"]
            .as_array()
            .expect("workspace_members")
            .iter()
            .map(|id| (names[&str_of(id)].clone(), str_of(id)))
            .collect();
        let normal = meta["resolve"]["nodes"]
            .as_array()
            .expect("resolve.nodes")
            .iter()
            .map(|node| {
                let deps = node["deps"]
                    .as_array()
                    .expect("deps")
                    .iter()
                    .filter(|dep| {
                        dep["dep_kinds"]
                            .as_array()
                            .expect("dep_kinds")
                            .iter()
                            .any(|k| k["kind"].is_null())
                    })
                    .map(|dep| str_of(&dep["pkg"]))
                    .collect();
                (str_of(&node["id"]), deps)
            })
            .collect();
        Self {
            names,
            members,
            normal,
        }
    }

    fn id(&self, member: &str) -> &str {
        self.members
            .get(member)
            .unwrap_or_else(|| panic!("{member} is not a workspace member"))
    }

    /// Names of a member's direct normal dependencies.
    fn direct(&self, member: &str) -> BTreeSet<&str> {
        self.normal[self.id(member)]
            .iter()
            .map(|id| self.names[id].as_str())
            .collect()
    }

    /// Names of every crate a member links, however indirectly, with the path to each.
    fn transitive(&self, member: &str) -> BTreeMap<&str, Vec<&str>> {
        let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let id = self.id(member);
        let mut stack = vec![(id, vec![self.names[id].as_str()])];
        while let Some((id, path)) = stack.pop() {
            for dep in &self.normal[id] {
                let name = self.names[dep].as_str();
                if seen.contains_key(name) {
                    continue;
                }
                let mut next = path.clone();
                next.push(name);
                seen.insert(name, next.clone());
                stack.push((dep, next));
            }
        }
        seen
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().expect("a string").to_owned()
}

#[test]
fn capability_crates_know_no_http_and_no_sql() {
    let graph = Graph::read();
    for &cap in CAPABILITIES {
        let direct = graph.direct(cap);
        for banned in HTTP.iter().chain(SQL) {
            assert!(
                !direct.contains(banned),
                "{cap} depends on {banned}: HTTP belongs to unhidra-server, SQL to unhidra-store"
            );
        }
        // Through the store it links sqlx, but nothing may bring it HTTP.
        let all = graph.transitive(cap);
        for banned in HTTP {
            if let Some(path) = all.get(banned) {
                panic!("{cap} links {banned} through {}", path.join(" → "));
            }
        }
    }
}

#[test]
fn protocol_depends_on_no_other_unhidra_crate() {
    let graph = Graph::read();
    let all = graph.transitive("unhidra-protocol");
    for name in all.keys() {
        assert!(
            !name.starts_with("unhidra"),
            "unhidra-protocol depends on {name}: the wire protocol is shared with devices and stands alone"
        );
    }
    for banned in HTTP.iter().chain(SQL).chain(&["tokio"]) {
        assert!(
            !all.contains_key(banned),
            "unhidra-protocol links {banned}: it has no I/O and no runtime"
        );
    }
}

#[test]
fn core_config_and_store_know_no_http() {
    let graph = Graph::read();
    for member in ["unhidra-core", "unhidra-config", "unhidra-store"] {
        let all = graph.transitive(member);
        for banned in HTTP {
            if let Some(path) = all.get(banned) {
                panic!("{member} links {banned} through {}", path.join(" → "));
            }
        }
    }
    for member in ["unhidra-core", "unhidra-config"] {
        let all = graph.transitive(member);
        for banned in SQL.iter().chain(&["tokio"]) {
            assert!(!all.contains_key(banned), "{member} links {banned}");
        }
    }
}

#[test]
fn only_the_server_and_the_binary_depend_on_the_server_stack() {
    let graph = Graph::read();
    for member in graph.members.keys() {
        if ["unhidra-server", "unhidra", "unhidra-bench"].contains(&member.as_str()) {
            continue;
        }
        let direct = graph.direct(member);
        assert!(
            !direct.contains("unhidra-server"),
            "{member} depends on unhidra-server: capabilities sit below the HTTP layer"
        );
        assert!(!direct.contains("axum"), "{member} depends on axum");
    }
}

#[test]
fn the_architecture_document_maps_every_crate() {
    let graph = Graph::read();
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("the document");
    // Headings read "### `crates/<dir>` — `<package>`" (the binary's: "— the binary").
    let mapped: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### `crates/"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    let dirs: BTreeSet<String> = std::fs::read_dir(root().join("crates"))
        .expect("crates/")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        mapped, dirs,
        "docs/ARCHITECTURE.md's code map must have one heading per crate directory"
    );
    assert_eq!(
        graph.members.len(),
        dirs.len(),
        "every crate directory is a workspace member"
    );
}

#[test]
fn every_module_says_what_it_is_for() {
    let mut missing = Vec::new();
    let mut dirs = vec![root().join("crates")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("a folder")
            .filter_map(Result::ok)
        {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && name != "node_modules" {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.components().any(|c| c.as_os_str() == "src")
                && name != "build.rs"
            {
                let text = std::fs::read_to_string(&path).expect("a source file");
                if !text.starts_with("//!") {
                    missing.push(path.display().to_string());
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a `//!` line saying what they are for: {missing:?}"
    );
}

#[test]
fn every_crate_is_licensed_mit_or_apache() {
    let meta = metadata();
    let members: BTreeSet<String> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(str_of)
        .collect();
    let wrong: Vec<String> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| members.contains(&str_of(&p["id"])))
        .filter(|p| p["license"].as_str() != Some("MIT OR Apache-2.0"))
        .map(|p| format!("{}: {}", str_of(&p["name"]), p["license"]))
        .collect();
    assert!(
        wrong.is_empty(),
        "every crate is `MIT OR Apache-2.0`: {wrong:?}"
    );
    let root = root();
    let mit = std::fs::read_to_string(root.join("LICENSE-MIT")).expect("LICENSE-MIT");
    assert!(
        mit.starts_with("MIT License"),
        "LICENSE-MIT is the MIT licence"
    );
    let apache = std::fs::read_to_string(root.join("LICENSE-APACHE")).expect("LICENSE-APACHE");
    assert!(
        apache.contains("Apache License") && apache.contains("Version 2.0, January 2004"),
        "LICENSE-APACHE is the Apache License 2.0"
    );
    // Vendored assets keep their own terms beside them.
    let swagger = root.join("crates/server/assets/swagger-ui");
    for notice in ["LICENSE", "NOTICE"] {
        assert!(
            swagger.join(notice).is_file(),
            "swagger-ui/{notice} is kept"
        );
    }
}
