//! The one mapping from a DynamoDB item to the JSON document stored in the cache.
//!
//! The item arrives in two forms: the read path's fill has `serde_dynamo` attributes (from
//! `GetItem`, [`Document::from_item`]), the invalidator's refresh has the stream image's DynamoDB
//! JSON (`{"price":{"N":"9.99"}}`, [`Document::from_image`]). Both are seen through one [`View`]
//! of an attribute and written by one writer, so the bytes in Redis are the same whichever path
//! wrote them (tested across every type). The image is read in place (see `image.rs`) rather
//! than deserialised into an item first: that copied every string once more, and building the
//! documents was most of a refresh batch's time.
//!
//! The mapping is written by hand because the generic route (`serde_dynamo` into
//! `serde_json::Value`) rounds 38-digit numbers to floats and fails on binary attributes:
//!
//! | DynamoDB | JSON |
//! |---|---|
//! | `S` | string |
//! | `N` | number, with the stored digits verbatim (`129.99` stays `129.99`) |
//! | `BOOL` | `true` / `false` |
//! | `NULL` | `null` |
//! | `M` | object, keys sorted |
//! | `L` | array, in order |
//! | `SS`, `NS`, `BS` | array, sorted (sets have no order; sorting makes the bytes stable) |
//! | `B`, `BS` members | base64 string (standard alphabet, padded) |

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine as _;
use serde_dynamo::AttributeValue;

mod image;

/// A product serialised as compact JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document(String);

/// An attribute that has no JSON form: a number DynamoDB itself would reject, or (in a stream
/// image) a value that is not DynamoDB JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attribute `{path}` {problem}")]
pub struct DocumentError {
    pub path: String,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("holds {0:?}, which is not a number")]
    NotANumber(String),
    #[error("is not DynamoDB JSON: {0}")]
    NotDynamoDbJson(&'static str),
}

impl Document {
    /// Builds the document of an item given as `serde_dynamo` attributes (SDK items through
    /// `serde_dynamo::Item::from`).
    pub fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Self, DocumentError> {
        write_item(item.iter().map(|(k, v)| (k.as_str(), v)).collect())
    }

    /// Builds the document of an item given as DynamoDB JSON, as stream records carry their
    /// images: the same bytes [`Document::from_item`] makes of the same item. Anything
    /// `serde_dynamo` would not read as an item is an error here too.
    pub fn from_image(image: &serde_json::Value) -> Result<Self, DocumentError> {
        let entries = image::entries(image).ok_or(DocumentError {
            path: String::new(),
            problem: Problem::NotDynamoDbJson("an item is an object"),
        })?;
        write_item(entries)
    }

    /// Wraps bytes read back from the cache. The cache holds only documents this module wrote,
    /// so they are not parsed again on the hot path.
    pub fn from_cached(json: String) -> Self {
        Self(json)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// One attribute seen through its DynamoDB type, its contents borrowed where the input holds
/// them as they are written: what both inputs reduce to.
enum View<'a, A> {
    S(&'a str),
    N(&'a str),
    Bool(bool),
    Null,
    B(Cow<'a, [u8]>),
    M(Vec<(&'a str, &'a A)>),
    L(&'a [A]),
    Ss(Vec<&'a str>),
    Ns(Vec<&'a str>),
    Bs(Vec<Cow<'a, [u8]>>),
}

/// An attribute value in one of the item's forms.
trait Attribute: Sized {
    /// The value's type and contents, or why it has none (only DynamoDB JSON can be malformed).
    fn view(&self) -> Result<View<'_, Self>, &'static str>;

    /// About how many bytes the value takes in the document, to size the buffer once for the
    /// large strings that make up most of a big item; nested values count a little.
    fn size_hint(&self) -> usize;
}

impl Attribute for AttributeValue {
    fn view(&self) -> Result<View<'_, Self>, &'static str> {
        Ok(match self {
            AttributeValue::S(s) => View::S(s),
            AttributeValue::N(n) => View::N(n),
            AttributeValue::Bool(b) => View::Bool(*b),
            AttributeValue::Null(_) => View::Null,
            AttributeValue::B(b) => View::B(Cow::Borrowed(b)),
            AttributeValue::M(m) => View::M(m.iter().map(|(k, v)| (k.as_str(), v)).collect()),
            AttributeValue::L(l) => View::L(l),
            AttributeValue::Ss(ss) => View::Ss(ss.iter().map(String::as_str).collect()),
            AttributeValue::Ns(ns) => View::Ns(ns.iter().map(String::as_str).collect()),
            AttributeValue::Bs(bs) => View::Bs(bs.iter().map(|b| Cow::Borrowed(&b[..])).collect()),
        })
    }

    fn size_hint(&self) -> usize {
        match self {
            AttributeValue::S(s) | AttributeValue::N(s) => s.len() + 2,
            AttributeValue::B(b) => b.len() * 4 / 3 + 4,
            _ => 16,
        }
    }
}

/// Where an attribute sits in the item, for errors only: built on the stack as the writer
/// descends and turned into text (`m.n`, `l[2]`) only when something is wrong.
#[derive(Clone, Copy)]
enum Path<'p> {
    Root,
    Key(&'p Path<'p>, &'p str),
    Index(&'p Path<'p>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        match self {
            Path::Root => String::new(),
            Path::Key(parent, key) => {
                let parent = parent.render();
                if parent.is_empty() {
                    (*key).to_owned()
                } else {
                    format!("{parent}.{key}")
                }
            }
            Path::Index(parent, i) => format!("{}[{i}]", parent.render()),
        }
    }

    fn error(&self, problem: Problem) -> DocumentError {
        DocumentError {
            path: self.render(),
            problem,
        }
    }
}

fn write_item<A: Attribute>(entries: Vec<(&str, &A)>) -> Result<Document, DocumentError> {
    let hint: usize = entries
        .iter()
        .map(|(k, v)| k.len() + v.size_hint() + 4)
        .sum();
    let mut out = String::with_capacity(hint + 2);
    write_map(&mut out, entries, &Path::Root)?;
    Ok(Document(out))
}

fn write_map<A: Attribute>(
    out: &mut String,
    mut entries: Vec<(&str, &A)>,
    path: &Path<'_>,
) -> Result<(), DocumentError> {
    // Keys compare as bytes; a map that iterates in order already (serde_json's) stays as is.
    if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    out.push('{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, k);
        out.push(':');
        write_value(out, v, &Path::Key(path, k))?;
    }
    out.push('}');
    Ok(())
}

fn write_value<A: Attribute>(
    out: &mut String,
    v: &A,
    path: &Path<'_>,
) -> Result<(), DocumentError> {
    let view = v
        .view()
        .map_err(|what| path.error(Problem::NotDynamoDbJson(what)))?;
    match view {
        View::S(s) => write_str(out, s),
        View::N(n) => write_number(out, n, path)?,
        View::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        View::Null => out.push_str("null"),
        View::B(b) => write_bytes(out, &b),
        View::M(m) => write_map(out, m, path)?,
        View::L(l) => {
            out.push('[');
            for (i, v) in l.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, v, &Path::Index(path, i))?;
            }
            out.push(']');
        }
        View::Ss(mut ss) => {
            ss.sort_unstable();
            write_array(out, ss, |out, s| {
                write_str(out, s);
                Ok(())
            })?;
        }
        View::Ns(ns) => {
            let mut ns: Vec<(f64, &str)> = ns
                .into_iter()
                .map(|n| (n.trim().parse::<f64>().unwrap_or(f64::NAN), n))
                .collect();
            // Numeric order reads naturally; the string breaks ties between numbers that differ
            // only beyond f64 precision, so the order is total and the same on both paths.
            ns.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
            write_array(out, ns, |out, (_, n)| write_number(out, n, path))?;
        }
        View::Bs(mut bs) => {
            bs.sort_unstable();
            write_array(out, bs, |out, b| {
                write_bytes(out, &b);
                Ok(())
            })?;
        }
    }
    Ok(())
}

fn write_array<T>(
    out: &mut String,
    items: Vec<T>,
    mut each: impl FnMut(&mut String, T) -> Result<(), DocumentError>,
) -> Result<(), DocumentError> {
    out.push('[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        each(out, item)?;
    }
    out.push(']');
    Ok(())
}

/// A JSON string, escaped exactly as `serde_json` escapes it (tested against it): `"` and `\`,
/// the short forms `\b \t \n \f \r`, other control characters as `\u00xx`, nothing else.
fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    // `bytes[start..i]` needs no escaping and is copied in one go.
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        // Eight bytes at a time while none needs escaping: long texts are most of a big item,
        // and most of them have nothing to escape.
        if let Some(word) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
            if !needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => {
                i += 1;
                continue;
            }
        };
        // `i` is at an ASCII byte, so both slices end on character boundaries.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push_str(short);
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Whether any of the eight bytes of `word` is a control character, `"` or `\` (the classic
/// "has a byte less than n" and "has a zero byte" word tricks; exact as a yes/no answer).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS != 0;
    control
        || has_zero(word ^ (ONES * u64::from(b'"')))
        || has_zero(word ^ (ONES * u64::from(b'\\')))
}

fn write_bytes(out: &mut String, b: &[u8]) {
    out.push('"');
    base64::engine::general_purpose::STANDARD.encode_string(b, out);
    out.push('"');
}

fn write_number(out: &mut String, n: &str, path: &Path<'_>) -> Result<(), DocumentError> {
    let start = out.len();
    if json_number(out, n.trim()).is_none() {
        out.truncate(start);
        return Err(path.error(Problem::NotANumber(n.to_owned())));
    }
    Ok(())
}

/// Appends the JSON spelling of a DynamoDB number, keeping every digit; `None` (with part of
/// it appended) for what is not a number. DynamoDB answers numbers in JSON-compatible form, but
/// it accepts `+1`, `.5`, `5.` and `007` on input, and stream emulators may echo them back, so
/// those are rewritten rather than stored as broken JSON.
fn json_number(out: &mut String, n: &str) -> Option<()> {
    let (sign, rest) = match n.as_bytes().first()? {
        b'-' => ("-", &n[1..]),
        b'+' => ("", &n[1..]),
        _ => ("", n),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !frac.is_none_or(all_digits) {
        return None;
    }
    if int.is_empty() && frac.is_none_or(str::is_empty) {
        return None;
    }
    out.push_str(sign);
    let int = int.trim_start_matches('0');
    out.push_str(if int.is_empty() { "0" } else { int });
    if let Some(f) = frac.filter(|f| !f.is_empty()) {
        out.push('.');
        out.push_str(f);
    }
    if let Some(e) = exponent {
        let (esign, edigits) = match e.as_bytes().first()? {
            b'-' => ("-", &e[1..]),
            b'+' => ("+", &e[1..]),
            _ => ("", e),
        };
        if edigits.is_empty() || !all_digits(edigits) {
            return None;
        }
        out.push('E');
        out.push_str(esign);
        out.push_str(edigits);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttributeValue as A;

    fn item(pairs: Vec<(&str, AttributeValue)>) -> HashMap<String, AttributeValue> {
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn number(n: &str) -> Option<String> {
        let mut out = String::new();
        json_number(&mut out, n).map(|()| out)
    }

    #[test]
    fn every_type_maps_as_documented() {
        let doc = Document::from_item(&item(vec![
            ("s", A::S("a \"quoted\"\nline ✓".into())),
            ("price", A::N("129.99".into())),
            ("big", A::N("12345678901234567890123456789012345678".into())),
            ("tiny", A::N("-0.000001".into())),
            ("t", A::Bool(true)),
            ("f", A::Bool(false)),
            ("nothing", A::Null(true)),
            ("bin", A::B(b"hello".to_vec())),
            (
                "m",
                A::M(item(vec![
                    ("z", A::N("1".into())),
                    ("a", A::L(vec![A::S("x".into()), A::N("2".into())])),
                ])),
            ),
            ("ss", A::Ss(vec!["b".into(), "a".into()])),
            ("ns", A::Ns(vec!["10".into(), "2.5".into(), "1".into()])),
            ("bs", A::Bs(vec![b"world".to_vec(), b"hello".to_vec()])),
        ]))
        .unwrap();
        assert_eq!(
            doc.as_str(),
            r#"{"big":12345678901234567890123456789012345678,"bin":"aGVsbG8=","bs":["aGVsbG8=","d29ybGQ="],"f":false,"m":{"a":["x",2],"z":1},"nothing":null,"ns":[1,2.5,10],"price":129.99,"s":"a \"quoted\"\nline ✓","ss":["a","b"],"t":true,"tiny":-0.000001}"#
        );
        // Whatever the mapping, the result must be JSON any client can parse.
        let v: serde_json::Value = serde_json::from_str(doc.as_str()).unwrap();
        assert_eq!(v["ss"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn same_item_in_any_order_gives_the_same_bytes() {
        let a = item(vec![
            ("a", A::N("1".into())),
            ("b", A::Ss(vec!["x".into(), "y".into()])),
        ]);
        let b = item(vec![
            ("b", A::Ss(vec!["y".into(), "x".into()])),
            ("a", A::N("1".into())),
        ]);
        assert_eq!(
            Document::from_item(&a).unwrap(),
            Document::from_item(&b).unwrap()
        );
    }

    #[test]
    fn numbers_keep_their_digits_and_become_valid_json() {
        let cases = [
            ("129.99", "129.99"),
            ("0", "0"),
            ("-0.5", "-0.5"),
            ("-0.0", "-0.0"),
            ("1E+2", "1E+2"),
            ("1E+125", "1E+125"),
            ("1e-130", "1E-130"),
            ("+7", "7"),
            ("007", "7"),
            (".5", "0.5"),
            ("5.", "5"),
            (
                "99999999999999999999999999999999999999",
                "99999999999999999999999999999999999999",
            ),
        ];
        for (n, want) in cases {
            assert_eq!(number(n).as_deref(), Some(want), "{n}");
            serde_json::from_str::<serde_json::Value>(want).unwrap();
        }
        for bad in [
            "", "-", ".", "abc", "1e", "1e+", "1.2.3", "0x10", "NaN", "1 2",
        ] {
            assert_eq!(number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_broken_number_is_an_error_naming_its_path() {
        let err = Document::from_item(&item(vec![(
            "m",
            A::M(item(vec![(
                "l",
                A::L(vec![A::N("1".into()), A::N("abc".into())]),
            )])),
        )]))
        .unwrap_err();
        assert_eq!(err.path, "m.l[1]");
        assert_eq!(err.problem, Problem::NotANumber("abc".into()));
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        // Every ASCII character, alone and at each place in and around an eight-byte word.
        for c in (0u8..0x80).map(char::from).chain(['é', '✓', '\u{2028}']) {
            for at in 0..18 {
                let mut s = "abcdefghijklmnopq".to_owned();
                s.insert(at.min(s.len()), c);
                for s in [s, c.to_string()] {
                    let mut out = String::new();
                    write_str(&mut out, &s);
                    assert_eq!(out, serde_json::to_string(&s).unwrap(), "{s:?}");
                }
            }
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..2000 {
            let s: String = (0..rng.usize(0..40))
                .map(|_| match rng.u8(0..4) {
                    0 => char::from(rng.u8(0..0x20)),
                    1 => ['"', '\\', 'ü', '😀'][rng.usize(0..4)],
                    _ => char::from(rng.u8(0x20..0x7f)),
                })
                .collect();
            let mut out = String::new();
            write_str(&mut out, &s);
            assert_eq!(out, serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }
}
