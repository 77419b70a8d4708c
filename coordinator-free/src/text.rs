//! Text from modules and peers on its way to a terminal or a log: control characters escaped,
//! so a module cannot move the cursor, clear the screen or hide a line with `\r`, and length
//! bounded where the text is made, so an error always fits the message that carries it.

/// Longest error text a unit's failure carries (after escaping), in bytes.
pub const MAX_TEXT: usize = 1024;

/// `text` with every control character written as an escape (`\u{1b}`, `\r`, `\0`, …).
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `text` escaped and cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn bounded(text: &str, max: usize) -> String {
    let escaped = escape_controls(text);
    if escaped.len() <= max {
        return escaped.into_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while end > 0 && !escaped.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = escaped[..end].to_owned();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            escape_controls("a\x1b[2Jb\rc\0d\ne"),
            "a\\u{1b}[2Jb\\rc\\u{0}d\\ne"
        );
    }

    #[test]
    fn bounded_text_fits_and_never_splits_a_character() {
        let long = "é".repeat(1000);
        let cut = bounded(&long, 101);
        assert!(cut.len() <= 101, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short", 10), "short");
        // Escapes count against the bound.
        assert!(bounded(&"\x1b".repeat(100), 50).len() <= 50);
    }
}
