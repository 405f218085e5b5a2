//! How a plain (unquoted) scalar's text is read, as NeMo's OmegaConf reads it.
//!
//! OmegaConf loads YAML with PyYAML (YAML 1.1) plus a float rule that also accepts `1e-4` (no dot): so `True`,
//! `yes`, `off` are booleans, `2e-5` and `0.` are floats, `~` and an empty value are null. zeroconv applies
//! these rules where the target type allows several readings (and to print and compare values); where the
//! typed config expects a string, the text is taken as written.

/// What a plain scalar means when nothing says which type is wanted.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
}

pub fn resolve_plain(text: &str) -> Resolved<'_> {
    if is_null(text) {
        Resolved::Null
    } else if let Some(b) = parse_bool(text) {
        Resolved::Bool(b)
    } else if let Some(i) = parse_int(text) {
        Resolved::Int(i)
    } else if let Some(x) = parse_float(text) {
        Resolved::Float(x)
    } else {
        Resolved::Str(text)
    }
}

pub fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// YAML 1.1 booleans (what PyYAML, hence OmegaConf, accepts), in the three spellings YAML allows.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// Decimal (with `_` separators, as YAML 1.1 and Python allow), `0x..` hex and `0o..` octal integers.
pub fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, body) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(oct) = digits.strip_prefix("0o") {
        (8, oct)
    } else {
        (10, digits)
    };
    if body.is_empty() || body.starts_with('_') || body.ends_with('_') {
        return None;
    }
    let cleaned: String = body.chars().filter(|&c| c != '_').collect();
    if !cleaned.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(&cleaned, radix).ok()?;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Floats as OmegaConf reads them: `1.5`, `.5`, `0.`, `1e-4`, `2.5E+3`, `1_000.5`, `.inf`, `-.inf`, `.nan`.
/// Integers are accepted too (a float field may be written `1`).
pub fn parse_float(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    if let Some(i) = parse_int(text) {
        return Some(i as f64);
    }
    let cleaned: String = text.chars().filter(|&c| c != '_').collect();
    let unsigned = cleaned.strip_prefix(['-', '+']).unwrap_or(&cleaned);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = digits(int_part)
        && frac_part.is_none_or(digits)
        && !(int_part.is_empty() && frac_part.is_none_or(str::is_empty));
    // Without an exponent a float needs its dot, or it would have been an integer above.
    let exponent_ok = match exponent {
        Some(e) => {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && digits(e)
        }
        None => frac_part.is_some(),
    };
    if mantissa_ok && exponent_ok {
        cleaned.parse::<f64>().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_omegaconf() {
        assert_eq!(resolve_plain("True"), Resolved::Bool(true));
        assert_eq!(resolve_plain("off"), Resolved::Bool(false));
        assert_eq!(resolve_plain("~"), Resolved::Null);
        assert_eq!(resolve_plain(""), Resolved::Null);
        assert_eq!(resolve_plain("-1"), Resolved::Int(-1));
        assert_eq!(resolve_plain("10000000000000"), Resolved::Int(10_000_000_000_000));
        assert_eq!(resolve_plain("0x1F"), Resolved::Int(31));
        assert_eq!(resolve_plain("2e-5"), Resolved::Float(2e-5));
        assert_eq!(resolve_plain("0."), Resolved::Float(0.0));
        assert_eq!(resolve_plain(".5"), Resolved::Float(0.5));
        assert_eq!(resolve_plain("1.0e-04"), Resolved::Float(1e-4));
        assert_eq!(resolve_plain("bf16"), Resolved::Str("bf16"));
        assert_eq!(resolve_plain("512, 512"), Resolved::Str("512, 512"));
        assert_eq!(resolve_plain("1.2.3"), Resolved::Str("1.2.3"));
        assert_eq!(resolve_plain("e5"), Resolved::Str("e5"));
        assert_eq!(resolve_plain("."), Resolved::Str("."));
        assert_eq!(resolve_plain("1e"), Resolved::Str("1e"));
        assert!(matches!(resolve_plain(".nan"), Resolved::Float(x) if x.is_nan()));
    }
}
