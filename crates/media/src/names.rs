//! Original names, sanitised: what a download calls the file, never where it is stored.

/// The longest name kept, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// Extensions that a browser, a web server or a desktop would run: refused anywhere in a
/// name (`photo.php.jpg`, `photo.jpg.php`), so that a name never makes a file something else.
const EXECUTABLE: &[&str] = &[
    "php", "php3", "php4", "php5", "php7", "phtml", "phar", "pht", "asp", "aspx", "ashx", "asmx",
    "cer", "jsp", "jspx", "cgi", "pl", "py", "rb", "sh", "bash", "exe", "dll", "com", "bat", "cmd",
    "msi", "scr", "ps1", "vbs", "vbe", "js", "mjs", "jse", "wsf", "hta", "jar", "html", "htm",
    "xhtml", "shtml", "svg", "svgz", "xml", "swf", "htaccess", "lnk", "app", "apk", "elf", "so",
    "dylib",
];

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing of it is left once sanitised.
    #[error("the name is empty")]
    Empty,
    /// It has an extension that runs.
    #[error("a name may not have the extension .{0}")]
    Executable(String),
}

/// A name as uploaded, sanitised: no path (the part after the last `/` or `\`), no control or
/// formatting characters (bidirectional overrides included), no leading or trailing dots and
/// spaces, at most [`MAX_NAME_CHARS`] characters (the extension kept); refused when empty or
/// when any of its extensions is one that runs.
pub fn sanitise(name: &str) -> Result<String, NameError> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control() && !is_format(*c))
        .collect();
    let cleaned = cleaned.trim_matches(|c: char| c == '.' || c.is_whitespace());
    if cleaned.is_empty() {
        return Err(NameError::Empty);
    }
    let kept = if cleaned.chars().count() <= MAX_NAME_CHARS {
        cleaned.to_owned()
    } else {
        let ext = extension(cleaned)
            .map(|e| format!(".{e}"))
            .unwrap_or_default();
        let keep = MAX_NAME_CHARS.saturating_sub(ext.chars().count());
        cleaned.chars().take(keep).collect::<String>() + &ext
    };
    // Checked on the name as kept: shortening must not make an extension that runs.
    for part in kept.split('.').skip(1) {
        let part = part.trim().to_ascii_lowercase();
        if EXECUTABLE.contains(&part.as_str()) {
            return Err(NameError::Executable(part));
        }
    }
    Ok(kept)
}

/// Unicode format characters (`Cf`) that change how a name reads: bidirectional marks,
/// overrides and isolates, zero-width characters, the byte-order mark.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}' | '\u{e0000}'..='\u{e007f}')
}

/// A name's extension, lower case, if it has one (`archive.tar.gz` → `gz`).
pub fn extension(name: &str) -> Option<String> {
    let (stem, ext) = name.rsplit_once('.')?;
    (!stem.is_empty() && !ext.is_empty() && ext.len() <= 16).then(|| ext.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_their_paths_controls_and_tricks() {
        for (given, kept) in [
            ("photo.jpg", "photo.jpg"),
            ("../../etc/passwd.txt", "passwd.txt"),
            ("C:\\Users\\me\\scan.PDF", "scan.PDF"),
            ("re\u{0}port\n.txt", "report.txt"),
            // "gnp.exe" shown as "exe.png" by a right-to-left override: the override goes.
            ("photo\u{202e}gnp.txt", "photognp.txt"),
            ("a\u{2028}b\u{061c}c\u{e0041}.txt", "abc.txt"),
            ("  .hidden.png. ", "hidden.png"),
            (
                "thermal 2026-03-01 12:00.tiff",
                "thermal 2026-03-01 12:00.tiff",
            ),
        ] {
            assert_eq!(sanitise(given).as_deref(), Ok(kept), "{given:?}");
        }
        assert_eq!(sanitise("../"), Err(NameError::Empty));
        assert_eq!(sanitise(" . "), Err(NameError::Empty));
    }

    #[test]
    fn no_extension_that_runs_anywhere_in_a_name() {
        for name in [
            "shell.jpg.php",
            "shell.php.jpg",
            "a.PhP5.png",
            "x.svg",
            "page.html",
            "run.exe",
        ] {
            assert!(
                matches!(sanitise(name), Err(NameError::Executable(_))),
                "{name}"
            );
        }
        assert!(sanitise("notes.phpx.txt").is_ok());
    }

    #[test]
    fn long_names_keep_their_extension() {
        let long = format!("{}.png", "a".repeat(500));
        let kept = sanitise(&long).unwrap();
        assert_eq!(kept.chars().count(), MAX_NAME_CHARS);
        assert!(kept.ends_with(".png"));
        // Shortened into an extension that runs: refused.
        let trick = format!("{}.htmlzzzz.png", "x".repeat(191));
        assert!(
            matches!(sanitise(&trick), Err(NameError::Executable(_))),
            "{:?}",
            sanitise(&trick)
        );
        assert_eq!(extension("a.tar.GZ").as_deref(), Some("gz"));
        assert_eq!(extension(".png"), None);
        assert_eq!(extension("README"), None);
    }
}
