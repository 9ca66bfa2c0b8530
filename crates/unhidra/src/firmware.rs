//! `unhidra firmware keygen` and `unhidra firmware sign`: the signing of images happens here,
//! off the server, which only ever holds the public keys.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use unhidra_ota::manifest::{self, Manifest};

#[derive(Debug, Subcommand)]
pub(crate) enum FirmwareCommand {
    /// Make an Ed25519 signing key: NAME.pem (private, mode 0600; keep it off the server) and
    /// NAME.pub.pem (for the server's `ota_trusted_keys`).
    Keygen {
        /// The path of the keys without extension.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
    },
    /// Sign an image: writes IMAGE.manifest.json (or --out) with its SHA-256, size, version,
    /// project, target and secure version, and the signature. The facts of an ESP32 app image
    /// are read from the image; other images are signed with `--generic` and the facts given.
    Sign(SignArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SignArgs {
    /// The private key (PKCS#8 PEM, as `keygen` or `openssl genpkey -algorithm ed25519` writes).
    #[arg(long, value_name = "KEY.pem")]
    key: PathBuf,
    /// The image.
    image: PathBuf,
    /// Where the manifest goes [default: IMAGE.manifest.json].
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// The image is not an ESP32 app image: take the facts below.
    #[arg(long)]
    generic: bool,
    /// The version (for an ESP32 image: must be the one it carries).
    #[arg(long)]
    version: Option<String>,
    /// The project (generic images).
    #[arg(long)]
    project: Option<String>,
    /// The target chip or board (generic images).
    #[arg(long)]
    target: Option<String>,
    /// The anti-rollback version (generic images; default 0).
    #[arg(long)]
    secure_version: Option<u32>,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("unhidra: {message}");
    ExitCode::FAILURE
}

pub(crate) fn run(command: &FirmwareCommand) -> ExitCode {
    match command {
        FirmwareCommand::Keygen { out } => keygen(out),
        FirmwareCommand::Sign(args) => sign(args),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn keygen(out: &Path) -> ExitCode {
    let key = manifest::generate_key();
    let (private, public) = match (
        manifest::private_pem(&key),
        manifest::public_pem(&key.verifying_key()),
    ) {
        (Ok(private), Ok(public)) => (private, public),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let private_path = with_suffix(out, ".pem");
    let public_path = with_suffix(out, ".pub.pem");
    // Created new with 0600, so the private key is never readable by others, not even briefly.
    let written = {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&private_path)
            .and_then(|mut file| file.write_all(private.as_bytes()))
    };
    if let Err(e) = written {
        return fail(format!("{}: {e}", private_path.display()));
    }
    if let Err(e) = std::fs::write(&public_path, &public) {
        return fail(format!("{}: {e}", public_path.display()));
    }
    println!(
        "key {} written: {} (private) and {} (public)",
        manifest::key_id(&key.verifying_key()),
        private_path.display(),
        public_path.display()
    );
    ExitCode::SUCCESS
}

fn sign(args: &SignArgs) -> ExitCode {
    let key = match std::fs::read_to_string(&args.key)
        .map_err(|e| e.to_string())
        .and_then(|pem| manifest::read_private_pem(&pem).map_err(|e| e.to_string()))
    {
        Ok(key) => key,
        Err(e) => return fail(format!("{}: {e}", args.key.display())),
    };
    let facts = match facts(args) {
        Ok(facts) => facts,
        Err(e) => return fail(e),
    };
    // The server refuses these, and devices could not report the version after the update.
    if let Some((field, rule)) = facts.invalid_fact() {
        return fail(format!(
            "{}: its {field} is refused: {rule}",
            args.image.display()
        ));
    }
    let signed = manifest::sign(facts, &key);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| with_suffix(&args.image, ".manifest.json"));
    let text = match serde_json::to_string_pretty(&signed) {
        Ok(text) => text,
        Err(e) => return fail(e),
    };
    if let Err(e) = std::fs::write(&out, text + "\n") {
        return fail(format!("{}: {e}", out.display()));
    }
    println!(
        "{} {} for {} signed by key {}: {}",
        signed.manifest.project,
        signed.manifest.version,
        signed.manifest.target,
        signed.key_id,
        out.display()
    );
    ExitCode::SUCCESS
}

/// The manifest of the image: read from an ESP32 image, or given for a generic one. The image
/// is read in chunks, never whole.
fn facts(args: &SignArgs) -> Result<Manifest, String> {
    use std::io::Read as _;
    let name = args.image.display();
    let mut file = std::fs::File::open(&args.image).map_err(|e| format!("{name}: {e}"))?;
    let mut checker = unhidra_ota::ImageChecker::new();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut size = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut chunk).map_err(|e| format!("{name}: {e}"))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        sha2::Digest::update(&mut hasher, &chunk[..n]);
        if !args.generic {
            checker
                .update(&chunk[..n])
                .map_err(|e| format!("{name}: {e} (sign other images with --generic)"))?;
        }
    }
    if args.generic {
        let need = |value: &Option<String>, flag: &str| {
            value
                .clone()
                .ok_or_else(|| format!("--generic needs {flag}"))
        };
        return Ok(Manifest {
            sha256: sha2::Digest::finalize(hasher)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            size,
            version: need(&args.version, "--version")?,
            project: need(&args.project, "--project")?,
            target: need(&args.target, "--target")?,
            secure_version: args.secure_version.unwrap_or(0),
        });
    }
    if args.project.is_some() || args.target.is_some() || args.secure_version.is_some() {
        return Err(
            "an ESP32 image's project, target and secure version come from the image; \
             drop --project, --target and --secure-version (or sign with --generic)"
                .into(),
        );
    }
    let image = checker
        .finish()
        .map_err(|e| format!("{name}: {e} (sign other images with --generic)"))?;
    if let Some(claimed) = &args.version
        && *claimed != image.version
    {
        return Err(format!(
            "{name} carries version {:?}, not {claimed:?}",
            image.version
        ));
    }
    Ok(Manifest {
        sha256: image.sha256,
        size: image.size,
        version: image.version,
        project: image.project,
        target: image.chip.to_owned(),
        secure_version: image.secure_version,
    })
}
