//! The types a file may have, told from its first bytes, and the extensions each allows.

/// A type Unhidra stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// Its media type, as downloads carry it.
    pub mime: &'static str,
    /// The extensions a name of this type may end with, lower case; the first is added to a
    /// name that has none.
    pub extensions: &'static [&'static str],
}

/// Every type an upload may have.
pub const ALLOWED: &[Kind] = &[
    Kind {
        mime: "image/jpeg",
        extensions: &["jpg", "jpeg"],
    },
    Kind {
        mime: "image/png",
        extensions: &["png"],
    },
    Kind {
        mime: "image/gif",
        extensions: &["gif"],
    },
    Kind {
        mime: "image/webp",
        extensions: &["webp"],
    },
    Kind {
        mime: "image/tiff",
        extensions: &["tif", "tiff"],
    },
    Kind {
        mime: "application/pdf",
        extensions: &["pdf"],
    },
    Kind {
        mime: "text/plain",
        extensions: &["txt", "csv", "log", "md"],
    },
];

/// How many first bytes decide a file's type.
pub const SNIFF_BYTES: usize = 8 * 1024;

/// The type of a file whose first bytes are `head` (all of it, when `complete`), if it is one
/// of [`ALLOWED`]; what it seems to be otherwise, for the refusal.
pub fn sniff(head: &[u8], complete: bool) -> Result<&'static Kind, Option<&'static str>> {
    if let Some(found) = infer::get(head) {
        let mime = found.mime_type();
        return ALLOWED.iter().find(|k| k.mime == mime).ok_or(Some(mime));
    }
    if is_text(head, complete) {
        return Ok(&ALLOWED[ALLOWED.len() - 1]);
    }
    Err(None)
}

/// Whether `head` is UTF-8 text: no NUL or other control characters but tab, line and page
/// breaks and carriage returns. An incomplete head may end inside a character.
fn is_text(head: &[u8], complete: bool) -> bool {
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        Err(e) if !complete && e.error_len().is_none() => {
            // Cut inside a character: the valid part decides.
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return false,
    };
    !head.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\u{c}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_content() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(sniff(png, true).unwrap().mime, "image/png");
        assert_eq!(
            sniff(b"\xff\xd8\xff\xe0\0\x10JFIF", true).unwrap().mime,
            "image/jpeg"
        );
        assert_eq!(sniff(b"%PDF-1.7\n", true).unwrap().mime, "application/pdf");
        assert_eq!(
            sniff(b"RIFF\0\0\0\0WEBPVP8 ", true).unwrap().mime,
            "image/webp"
        );
        assert_eq!(
            sniff(b"II*\0\x08\0\0\0\x0e\0\0\x01\x03\0", true)
                .unwrap()
                .mime,
            "image/tiff"
        );
        assert_eq!(
            sniff("t,°C\n1,20.5\n".as_bytes(), true).unwrap().mime,
            "text/plain"
        );
        // An executable, an archive, a script with a NUL, binary noise: refused, and named
        // when known.
        assert_eq!(
            sniff(b"MZ\x90\0\x03\0\0\0\x04\0", true),
            Err(Some("application/vnd.microsoft.portable-executable"))
        );
        assert!(sniff(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0", true).is_err());
        assert_eq!(
            sniff(b"PK\x03\x04\x14\0\0\0", true),
            Err(Some("application/zip"))
        );
        assert_eq!(sniff(b"<?php\0", true), Err(None));
        assert_eq!(sniff(b"\x01\x02\x03", true), Err(None));
        assert_eq!(sniff(b"", true), Err(None));
    }

    #[test]
    fn text_may_be_cut_inside_a_character_until_it_is_whole() {
        let cut = &"°C".as_bytes()[..1];
        assert!(sniff(&[b"t ".as_slice(), cut].concat(), false).is_ok());
        assert!(sniff(&[b"t ".as_slice(), cut].concat(), true).is_err());
    }
}
