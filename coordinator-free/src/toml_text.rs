//! TOML errors as a person reads them, shared by the job manifest and the worker's config
//! file: where (line, column, and the key set on that line), what is wrong in words rather
//! than in Rust type names, and, for messages that may span lines, the line itself with the
//! spot marked.

/// Longest line quoted under an error.
const MAX_QUOTED_LINE: usize = 160;

/// Where an error is and what it says: `line N, column C, field `KEY`: MESSAGE`, on one line,
/// so it fits a log line or a one-line refusal.
pub fn headline(text: &str, err: &toml::de::Error) -> String {
    place(text, err).map_or_else(|| in_words(err.message().trim()), |p| p.headline)
}

/// [`headline`], then the line it is about with the spot marked on the line below (left out
/// when the line is too long to quote).
pub fn describe(text: &str, err: &toml::de::Error) -> String {
    let Some(place) = place(text, err) else {
        return in_words(err.message().trim());
    };
    let mut out = place.headline;
    if place.line.chars().count() <= MAX_QUOTED_LINE {
        let gutter = place.number.to_string();
        out.push_str(&format!(
            "\n  {gutter} | {}\n  {} | {}{}",
            place.line,
            " ".repeat(gutter.len()),
            " ".repeat(place.column - 1),
            "^".repeat(place.marked)
        ));
    }
    out
}

/// An error's place in the text.
struct Place<'a> {
    headline: String,
    line: &'a str,
    number: usize,
    column: usize,
    /// Characters of the line the error's span covers (at least one).
    marked: usize,
}

fn place<'a>(text: &'a str, err: &toml::de::Error) -> Option<Place<'a>> {
    let message = in_words(err.message().trim());
    let span = err.span()?;
    let (before, _) = (text.get(..span.start)?, text.get(span.start..)?);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[span.start..]
        .find('\n')
        .map_or(text.len(), |i| span.start + i);
    let line = text[line_start..line_end].trim_end_matches('\r');
    let number = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let field = field_on_line(&text[..line_start], line)
        .map(|f| format!(", field `{f}`"))
        .unwrap_or_default();
    let marked = text
        .get(span.start..span.end.min(line_start + line.len()).max(span.start))
        .map_or(1, |m| m.chars().count().max(1));
    Some(Place {
        headline: format!("line {number}, column {column}{field}: {message}"),
        line,
        number,
        column,
        marked,
    })
}

/// Serde's names of Rust types, in the words of the file's reader.
fn in_words(message: &str) -> String {
    let mut out = message.to_owned();
    for (rust, words) in [
        ("i64", "a whole number"),
        ("u64", "a whole number"),
        ("u32", "a whole number"),
        ("u16", "a whole number"),
        ("f64", "a number"),
        ("a sequence", "a list"),
        ("path string", "a path (a string)"),
    ] {
        out = out.replace(&format!("expected {rust}"), &format!("expected {words}"));
    }
    out
}

/// The dotted name of the key set on `line` (a `key = value` line), under the last table
/// header in `above`.
fn field_on_line(above: &str, line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = |k: &str| {
        !k.is_empty()
            && k.split('.').all(|part| {
                let part = part.trim();
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
    };
    if !bare(key) {
        return None;
    }
    let table = above.lines().rev().map(str::trim).find_map(|l| {
        l.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(|t| t.trim_start_matches('[').trim().to_owned())
    });
    Some(match table {
        Some(table) if bare(&table) => format!("{table}.{key}"),
        _ => key.to_owned(),
    })
}
