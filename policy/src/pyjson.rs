//! JSON text as Python's `json.dumps` writes it, for chat templates' `tojson` filter.
//!
//! Hugging Face transformers renders chat templates with a `tojson` of its own that calls
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, so tool
//! definitions and tool-call arguments reach the prompt with Python's spacing (`", "` and
//! `": "`), key order as given, non-ASCII text as is, and Python's float spelling. A prompt
//! that differs by one space hashes to other KV blocks, so this module writes exactly that.

use serde_json::Value;

/// `json.dumps` options a template may pass to `tojson`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub ensure_ascii: bool,
    /// Indent per level (Python's `indent`: a number of spaces, or a string).
    pub indent: Option<String>,
    /// `(item, key)` separators; Python's default is `(", ", ": ")`, or `(",", ": ")` with an
    /// indent.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

impl Default for Options {
    /// transformers' defaults: `ensure_ascii=False`, no indent, default separators, keys as given.
    fn default() -> Self {
        Self { ensure_ascii: false, indent: None, separators: None, sort_keys: false }
    }
}

/// `v` as `json.dumps(v, **opts)` writes it.
pub fn dumps(v: &Value, opts: &Options) -> String {
    let (item, key) = match &opts.separators {
        Some((i, k)) => (i.clone(), k.clone()),
        None if opts.indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    write_value(&mut out, v, opts, &item, &key, 0);
    out
}

fn newline(out: &mut String, indent: &Option<String>, level: usize) {
    if let Some(unit) = indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(unit);
        }
    }
}

fn write_value(out: &mut String, v: &Value, opts: &Options, item: &str, key: &str, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_str(out, s, opts.ensure_ascii),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, &opts.indent, level + 1);
                write_value(out, x, opts, item, key, level + 1);
            }
            newline(out, &opts.indent, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, &opts.indent, level + 1);
                write_str(out, k, opts.ensure_ascii);
                out.push_str(key);
                write_value(out, x, opts, item, key, level + 1);
            }
            newline(out, &opts.indent, level);
            out.push('}');
        }
    }
}

/// A JSON string as Python escapes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other control
/// characters as `\u00XX`, and with `ensure_ascii` every non-ASCII character as `\uXXXX`
/// (surrogate pairs above U+FFFF).
fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `v` as Python's `str()` prints it, which is how Jinja2 prints a value in `{{ }}` and what
/// its `string` filter gives: a string as is, `True`/`False`/`None`, and containers as their
/// `repr` (`{'city': 'Paris', 'days': 2.5}`).
pub fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// Python's `repr` of a JSON value.
pub fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, v);
    out
}

fn write_repr(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => repr_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, x);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_str(out, k);
                out.push_str(": ");
                write_repr(out, x);
            }
            out.push('}');
        }
    }
}

/// A string's `repr`: single quotes unless it holds a single quote and no double quote.
fn repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => match c as u32 {
                n if n < 0x100 => out.push_str(&format!("\\x{n:02x}")),
                n if n < 0x10000 => out.push_str(&format!("\\u{n:04x}")),
                n => out.push_str(&format!("\\U{n:08x}")),
            },
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for the characters prompts carry: not control characters (Cc),
/// not whitespace other than the space (Zs, Zl, Zp), not the common format characters (Cf: soft
/// hyphen, zero-width and direction marks, word joiners, BOM), not surrogates or private use.
/// Unassigned code points (Cn) are taken as printable: this module carries no Unicode tables.
fn py_printable(c: char) -> bool {
    let n = c as u32;
    !(c.is_control()
        || (c.is_whitespace() && c != ' ')
        || n == 0xad
        || (0x600..=0x605).contains(&n)
        || (0x200b..=0x200f).contains(&n)
        || (0x202a..=0x202e).contains(&n)
        || (0x2060..=0x2064).contains(&n)
        || (0x2066..=0x206f).contains(&n)
        || n == 0xfeff
        || (0xe000..=0xf8ff).contains(&n)
        || (0xf0000..=0x10ffff).contains(&n))
}

/// `repr` of a float inside a container (Python prints `inf`/`nan` there, not JSON's names).
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        py_float(f)
    }
}

/// A float as Python's `repr` writes it: the shortest digits that round-trip, in fixed notation
/// for exponents from -4 to 15 (always with a fractional part), else `d.ddde+XX`.
pub fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: `-1.2345e-7`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{}{frac}e{esign}{:02}", &digits[..1], exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Expected strings are what CPython 3.11's `json.dumps` prints for the same values.
    #[test]
    fn writes_what_python_writes() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.5, "é\n"], "a": {"x": null, "y": true}, "e": [], "f": {}}"#).unwrap();
        assert_eq!(
            dumps(&v, &Options::default()),
            r#"{"b": [1, 2.5, "é\n"], "a": {"x": null, "y": true}, "e": [], "f": {}}"#
        );
        let ascii = Options { ensure_ascii: true, ..Options::default() };
        assert_eq!(dumps(&json!("é😀\u{1}"), &ascii), r#""\u00e9\ud83d\ude00\u0001""#);
        let indented = Options { indent: Some("  ".into()), ..Options::default() };
        assert_eq!(
            dumps(&json!({"a": [1, {}], "b": "x"}), &indented),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": \"x\"\n}"
        );
        let sorted = Options { sort_keys: true, separators: Some((",".into(), ":".into())), ..Options::default() };
        assert_eq!(dumps(&json!({"b": 1, "a": 2}), &sorted), r#"{"a":2,"b":1}"#);
    }

    #[test]
    fn str_and_repr_print_as_python_does() {
        let v: Value =
            serde_json::from_str(r#"{"city": "Paris", "n": [1, 2.5, true, null], "q": "it's", "e": {}}"#).unwrap();
        assert_eq!(py_str(&v), r#"{'city': 'Paris', 'n': [1, 2.5, True, None], 'q': "it's", 'e': {}}"#);
        assert_eq!(py_str(&json!("plain")), "plain");
        assert_eq!(py_str(&json!(false)), "False");
        assert_eq!(py_repr(&json!("a\nb\\'\"")), r#"'a\nb\\\'"'"#);
        // Python: repr('\xa0\u200b\u3000é') == "'\\xa0\\u200b\\u3000é'"
        assert_eq!(py_repr(&json!("\u{a0}\u{200b}\u{3000}é")), r"'\xa0\u200b\u3000é'");
        let ascii = Options { ensure_ascii: true, ..Options::default() };
        assert_eq!(dumps(&json!("\u{7f}"), &ascii), r#""\u007f""#);
    }

    #[test]
    fn floats_read_as_python_reprs_them() {
        let cases = [
            (0.1, "0.1"),
            (100.0, "100.0"),
            (1e-7, "1e-07"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (123456789012345.0, "123456789012345.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float(f), want, "{f}");
        }
    }
}
