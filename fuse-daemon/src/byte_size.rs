//! Byte sizes as people write them, in flags and config files: `262144`, `256KiB`,
//! `10GiB`, `1.5G`, `500MB`. IEC units (`KiB`, `MiB`, `GiB`, `TiB`) and bare `K`,
//! `M`, `G`, `T` are powers of 1024; SI units (`kB`/`KB`, `MB`, `GB`, `TB`) powers
//! of 1000. Config files take a number or such a string.

/// Parses a byte size (see the module notes).
pub fn parse(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{text:?} is not a byte size: use a number of bytes, or one with KiB, MiB, GiB, TiB (or K, M, G, T), kB, MB, GB, TB"
            ))
        }
    };
    let bad = || format!("{text:?} is not a byte size");
    if number.is_empty() {
        return Err(bad());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"));
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = (value * scale as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// A byte size in a config file: a number, or a string with a unit.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Written {
    Number(u64),
    Text(String),
}

/// `#[serde(deserialize_with = "byte_size::deserialize")]` for a `u64`.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match <Written as serde::Deserialize>::deserialize(deserializer)? {
        Written::Number(n) => Ok(n),
        Written::Text(text) => parse(&text).map_err(serde::de::Error::custom),
    }
}

/// The same for an `Option<u64>` (use with `#[serde(default)]`).
pub fn deserialize_option<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units_as_people_write_them() {
        for (text, bytes) in [
            ("262144", 262_144),
            ("256KiB", 262_144),
            ("256K", 262_144),
            ("10GiB", 10 << 30),
            ("10 GiB", 10 << 30),
            ("1.5G", 3 << 29),
            ("500MB", 500_000_000),
            ("2kB", 2_000),
            ("0", 0),
            ("7b", 7),
        ] {
            assert_eq!(parse(text), Ok(bytes), "{text}");
        }
        for text in ["", "GiB", "10 parsecs", "-1", "1.2.3M", "99999999999TiB"] {
            assert!(parse(text).is_err(), "{text}");
        }
        assert!(parse("10 parsecs").unwrap_err().contains("KiB, MiB"));
    }
}
