//! The escaping toolkit for untrusted text on Discord: agent arguments,
//! justifications and names, and Discord users' names and reasons. Each
//! function makes text unable to close a code block, render markdown or
//! masked links, mention anyone, fake a line of Discord UI or hide
//! characters, and the cutters keep it within Discord's limits (counted as
//! Discord counts them).
//!
//! Pure: no serenity, no I/O. Used by the card renderer and the slash
//! command replies.

/// Budget for a short untrusted value (a name, an id, a code span).
pub(crate) const SHORT_BUDGET: usize = 120;

/// Shown where something was cut.
pub const TRUNCATED: &str = "… [truncated]";

/// Characters that render as nothing or reorder text: shown as `⟨U+XXXX⟩`.
pub fn is_hidden(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{205F}'..='\u{206F}'
        | '\u{3164}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E007F}')
        || (c.is_control() && c != '\n' && c != '\t')
}

/// Replaces hidden and control characters (except newline and tab) with a
/// visible marker.
pub fn reveal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_hidden(c) {
            out.push_str(&format!("⟨U+{:04X}⟩", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The look-alike used for backticks inside code (U+02CB): it cannot close
/// a code span or block.
const BACKTICK_STANDIN: char = 'ˋ';

/// Length as Discord's limits count it. Counted in UTF-16 units, which is
/// never less than code points: safe whichever of the two Discord counts.
pub fn length(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Cuts `s` to at most `max` characters ([`length`]), marking the cut.
pub fn fit(s: &str, max: usize) -> (String, bool) {
    if length(s) <= max {
        return (s.to_string(), false);
    }
    let keep = max.saturating_sub(length(TRUNCATED));
    let mut out = String::new();
    let mut n = 0;
    for c in s.chars() {
        n += c.len_utf16();
        if n > keep {
            break;
        }
        out.push(c);
    }
    out.push_str(TRUNCATED);
    (out, true)
}

/// A fenced code block holding untrusted text, at most `max` characters in
/// all. Inside a code block nothing renders (no markdown, links, mentions);
/// backticks are replaced so the fence cannot be closed early.
pub fn code_block(s: &str, lang: &str, max: usize) -> (String, bool) {
    let body: String = reveal(s)
        .chars()
        .map(|c| if c == '`' { BACKTICK_STANDIN } else { c })
        .collect();
    let open = format!("```{lang}\n");
    let close = "\n```";
    let room = max.saturating_sub(length(&open) + length(close));
    let (body, cut) = fit(&body, room);
    (format!("{open}{body}{close}"), cut)
}

/// An inline code span on one line: for names and ids.
pub fn inline_code(s: &str, max: usize) -> String {
    let body: String = single_line(s)
        .chars()
        .map(|c| if c == '`' { BACKTICK_STANDIN } else { c })
        .collect();
    if body.trim().is_empty() {
        return "—".into();
    }
    let (body, _) = fit(&body, max.saturating_sub(2));
    format!("`{body}`")
}

/// Untrusted free text made compact, so blank space cannot push the rest
/// of a card off-screen: spaces and tabs at line ends dropped and runs of
/// them made one space, runs of blank lines made one, blank lines at both
/// ends dropped.
pub fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(8192));
    let mut blank_run = false;
    for line in s.lines() {
        let mut l = String::with_capacity(line.len());
        let mut space = false;
        for c in line.trim().chars() {
            if c.is_whitespace() {
                space = true;
                continue;
            }
            if space {
                l.push(' ');
                space = false;
            }
            l.push(c);
        }
        if l.is_empty() {
            blank_run = !out.is_empty();
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
            if blank_run {
                out.push('\n');
            }
        }
        blank_run = false;
        out.push_str(&l);
    }
    out
}

/// Keyturn's own text (a rule's explanation): shown as written, with its
/// `code spans` as real code spans. The values it quotes may come from the
/// agent, so text between spans goes through [`plain`] and each span
/// through [`inline_code`]: whatever the text holds, nothing renders,
/// links or pings; a stray backtick in a quoted value only shifts the
/// spans.
pub fn trusted(s: &str) -> String {
    s.split('`')
        .enumerate()
        .map(|(i, part)| match (i % 2, part.is_empty()) {
            (_, true) => String::new(),
            (0, false) => plain(part),
            _ => inline_code(part, SHORT_BUDGET),
        })
        .collect()
}

/// One line: hidden characters revealed, line breaks shown as `⏎`.
pub fn single_line(s: &str) -> String {
    reveal(s)
        .chars()
        .map(|c| match c {
            '\n' | '\r' => '⏎',
            '\t' => ' ',
            c => c,
        })
        .collect()
}

/// Untrusted text as plain, single-line markdown: every markdown, mention
/// and link character is backslash-escaped, and `://` is broken so that no
/// URL becomes a link.
pub fn plain(s: &str) -> String {
    let line = single_line(s);
    let mut out = String::with_capacity(line.len() + 8);
    let chars: Vec<char> = line.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == '`' {
            out.push(BACKTICK_STANDIN);
            continue;
        }
        // `:` matters only in `://` (auto-links); `<t:` is broken by `\<`.
        let url = c == ':' && chars.get(i + 1) == Some(&'/') && chars.get(i + 2) == Some(&'/');
        if "\\*_~|>#[]()<@!-".contains(c) || url {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_is_exact_at_the_limit() {
        assert_eq!(fit("abc", 3), ("abc".to_string(), false));
        let (s, cut) = fit("abcd", 3 + TRUNCATED.chars().count());
        assert!(!cut && s == "abcd");
        let (s, cut) = fit(&"a".repeat(1025), 1024);
        assert!(cut);
        assert_eq!(s.chars().count(), 1024);
        let (s, cut) = code_block(&"a".repeat(2000), "json", 1024);
        assert!(cut);
        assert_eq!(s.chars().count(), 1024);
    }

    #[test]
    fn escapers() {
        assert_eq!(plain("[a](b)"), "\\[a\\]\\(b\\)");
        assert_eq!(plain("@everyone"), "\\@everyone");
        assert_eq!(plain("discord:1 https://x"), "discord:1 https\\://x");
        assert_eq!(inline_code("a`b", 50), "`aˋb`");
        assert_eq!(single_line("a\nb"), "a⏎b");
        assert_eq!(reveal("a\u{202E}b"), "a⟨U+202E⟩b");
        assert_eq!(code_block("```", "text", 100).0, "```text\nˋˋˋ\n```");
    }

    #[test]
    fn tidy_collapses_blank_runs_and_whitespace() {
        assert_eq!(tidy("a\n \n\t\n\n\nb  \t c  \n"), "a\n\nb c");
        assert_eq!(tidy(&"\n  \n".repeat(200)), "");
        assert_eq!(tidy("  x\r\ny"), "x\ny");
    }

    #[test]
    fn trusted_text_keeps_code_spans_and_escapes_the_rest() {
        assert_eq!(
            trusted("`delete_file` is allowed by `delete_*`"),
            "`delete_file` is allowed by `delete_*`"
        );
        let t = trusted("x `<@1>` y <@2> [l](https://e) `a`b`");
        assert!(t.contains("`<@1>`"), "{t}");
        assert!(t.contains("\\<\\@2\\>"), "{t}");
        assert!(t.contains("https\\://"), "{t}");
        assert!(!t.contains(BACKTICK_STANDIN), "{t}");
    }
}
