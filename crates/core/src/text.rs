//! Which control characters a text field may hold. NUL never: PostgreSQL cannot store it in
//! text, and it truncates strings in C libraries and log viewers. The other C0 controls and DEL
//! have no business in names, ids or queries (they spoof terminals that show logs), and only
//! tab and line breaks belong in free text such as a message. Names, ids and queries also
//! refuse the bidirectional embedding, override and isolate controls (U+202A–U+202E,
//! U+2066–U+2069), which make a name read differently from what it is; free text keeps them,
//! since right-to-left writing uses them.

/// What a field allows beyond printable text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controls {
    /// No control character at all, nor a bidirectional override (names, ids, queries).
    None,
    /// Tab, line feed and carriage return (free text: messages).
    LineBreaks,
}

/// The first control character `text` may not hold under `allowed`, if any.
pub fn forbidden_control(text: &str, allowed: Controls) -> Option<char> {
    text.chars().find(|&c| match allowed {
        Controls::None => {
            c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        }
        Controls::LineBreaks => c.is_control() && !matches!(c, '\t' | '\n' | '\r'),
    })
}

/// Bytes as lower-case hex (a digest as the API shows it).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_escapes_are_refused_line_breaks_only_in_free_text() {
        assert_eq!(forbidden_control("plain 😀 text", Controls::None), None);
        assert_eq!(
            forbidden_control("a\u{0}b", Controls::LineBreaks),
            Some('\u{0}')
        );
        assert_eq!(
            forbidden_control("\u{1b}[2J", Controls::LineBreaks),
            Some('\u{1b}')
        );
        assert_eq!(
            forbidden_control("del\u{7f}", Controls::LineBreaks),
            Some('\u{7f}')
        );
        assert_eq!(
            forbidden_control("two\nlines\r\n\tok", Controls::LineBreaks),
            None
        );
        assert_eq!(forbidden_control("two\nlines", Controls::None), Some('\n'));
        assert_eq!(
            forbidden_control("admin\u{202e}gpj", Controls::None),
            Some('\u{202e}')
        );
        assert_eq!(
            forbidden_control("שלום \u{2067}x\u{2069}", Controls::LineBreaks),
            None
        );
    }
}
