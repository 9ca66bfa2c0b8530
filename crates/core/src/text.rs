//! Which control characters a text field may hold. NUL never: PostgreSQL cannot store it in
//! text, and it truncates strings in C libraries and log viewers. The other C0 controls and DEL
//! have no business in names, ids or queries (they spoof terminals that show logs), and only
//! tab and line breaks belong in free text such as a message.

/// What a field allows beyond printable text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controls {
    /// No control character at all (names, ids, queries).
    None,
    /// Tab, line feed and carriage return (free text: messages).
    LineBreaks,
}

/// The first control character `text` may not hold under `allowed`, if any.
pub fn forbidden_control(text: &str, allowed: Controls) -> Option<char> {
    text.chars().find(|&c| {
        c.is_control() && !(allowed == Controls::LineBreaks && matches!(c, '\t' | '\n' | '\r'))
    })
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
    }
}
