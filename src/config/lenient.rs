//! Values that also come as strings: every environment variable is a
//! string, so the types say how to read one (`"30"` for a number,
//! `"true"` for a flag, `"a,b"` for a list) instead of a table of keys.
//!
//! A string is only ever parsed by these functions, never by figment's own
//! `Value::from_str`, which panics on some inputs (found by fuzzing: a
//! quoted string with a multi-byte character before a backslash).

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};

/// A whole number, or a string holding one.
pub fn u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(WholeNumber)
}

/// [`u64()`], for a key that may be absent.
pub fn opt_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    u64(deserializer).map(Some)
}

/// A finite number, or a string holding one.
pub fn f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    deserializer.deserialize_any(Fraction)
}

/// [`f64()`], for a key that may be absent.
pub fn opt_f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    f64(deserializer).map(Some)
}

/// `true` or `false`, as a boolean or a string (any case).
pub fn bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    deserializer.deserialize_any(Flag)
}

/// [`bool()`], for a key that may be absent.
pub fn opt_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    bool(deserializer).map(Some)
}

/// A list of strings, or one string of comma-separated items (blanks
/// dropped).
pub fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    deserializer.deserialize_any(List)
}

struct WholeNumber;

impl<'de> Visitor<'de> for WholeNumber {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number (0 or more)")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        v.trim()
            .parse()
            .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
    }
}

struct Fraction;

impl<'de> Visitor<'de> for Fraction {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        if v.is_finite() {
            Ok(v)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        match v.trim().parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(n),
            _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
        }
    }
}

struct Flag;

impl<'de> Visitor<'de> for Flag {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("true or false")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match v.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
        }
    }
}

struct List;

impl<'de> Visitor<'de> for List {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of strings, or one comma-separated string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        Ok(v.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_string)
            .collect())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<String>()? {
            items.push(item);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Shape {
        #[serde(deserialize_with = "super::u64")]
        n: u64,
        #[serde(deserialize_with = "super::f64")]
        f: f64,
        #[serde(deserialize_with = "super::bool")]
        b: bool,
        #[serde(deserialize_with = "super::list")]
        l: Vec<String>,
    }

    fn read(text: &str) -> Result<Shape, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn numbers_flags_and_lists_from_their_types_or_strings() {
        let typed = read("n = 30\nf = 0.25\nb = true\nl = [\"a\", \"b\"]").unwrap();
        let strings = read("n = \" 30 \"\nf = \"0.25\"\nb = \"TRUE\"\nl = \" a, ,b,\"").unwrap();
        assert_eq!(typed, strings);
        assert_eq!(typed.l, vec!["a".to_string(), "b".to_string()]);
        let empty = read("n = 0\nf = 1\nb = false\nl = \"\"").unwrap();
        assert!(empty.l.is_empty());
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        for (text, needle) in [
            ("n = -1\nf = 0\nb = true\nl = []", "whole number"),
            ("n = \"-1\"\nf = 0\nb = true\nl = []", "whole number"),
            ("n = \"1.5\"\nf = 0\nb = true\nl = []", "whole number"),
            ("n = \"\\\"é\\\\\"\nf = 0\nb = true\nl = []", "whole number"),
            ("n = 1\nf = \"nan\"\nb = true\nl = []", "number"),
            ("n = 1\nf = \"1e400\"\nb = true\nl = []", "number"),
            ("n = 1\nf = 0\nb = \"yes\"\nl = []", "true or false"),
            ("n = 1\nf = 0\nb = true\nl = 5", "list"),
        ] {
            let error = read(text).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }
}
