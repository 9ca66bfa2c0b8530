//! What a device is described with, parsed once at the edge: names, models, tags, metadata,
//! hardware ids and timeouts, each with its documented limits (`docs/devices.md`).

use unhidra_core::{Controls, forbidden_control};

use crate::DeviceError;

/// The longest name, in characters.
pub const MAX_NAME: usize = 100;
/// The longest model, firmware version or hardware id, in characters.
pub const MAX_IDENT: usize = 64;
/// The longest location, in characters.
pub const MAX_LOCATION: usize = 200;
/// The most tags of a device.
pub const MAX_TAGS: usize = 32;
/// The longest tag, in characters.
pub const MAX_TAG: usize = 64;
/// The largest metadata object, in bytes of JSON.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// The deepest nesting of metadata.
pub const MAX_METADATA_DEPTH: usize = 8;
/// The shortest inactivity timeout, in seconds.
pub const MIN_TIMEOUT_SECS: i64 = 10;
/// The longest inactivity timeout: 30 days, in seconds.
pub const MAX_TIMEOUT_SECS: i64 = 30 * 24 * 3600;

fn invalid(field: &'static str, code: &'static str, message: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(field, code, message.into())
}

/// A device's name: 1 to 100 characters, no control characters, trimmed.
pub fn name(text: &str) -> Result<String, DeviceError> {
    let text = text.trim();
    if text.is_empty() || text.chars().count() > MAX_NAME {
        return Err(invalid(
            "/name",
            "invalid_length",
            format!("a name has 1 to {MAX_NAME} characters"),
        ));
    }
    if forbidden_control(text, Controls::None).is_some() {
        return Err(invalid(
            "/name",
            "invalid_characters",
            "a name has no control characters",
        ));
    }
    Ok(text.to_owned())
}

/// Whether `text` is an identifier: 1 to 64 of ASCII letters, digits and `._:-`, starting
/// with a letter or digit.
fn is_ident(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_IDENT
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// An identifier field (model, hardware id, firmware version) at `field`.
pub fn ident(field: &'static str, text: &str) -> Result<String, DeviceError> {
    if is_ident(text) {
        Ok(text.to_owned())
    } else {
        Err(invalid(
            field,
            "invalid_format",
            format!(
                "1 to {MAX_IDENT} ASCII letters, digits and `._:-`, starting with a letter or digit"
            ),
        ))
    }
}

/// A firmware version as a device reports it and a manifest carries it
/// ([`unhidra_protocol::firmware::is_version`]).
pub fn firmware_version(text: &str) -> Result<(), DeviceError> {
    if unhidra_protocol::firmware::is_version(text) {
        Ok(())
    } else {
        Err(invalid(
            "firmware",
            "invalid_format",
            "1 to 31 printable ASCII characters without spaces",
        ))
    }
}

/// A location: up to 200 characters, no control characters; empty means none.
pub fn location(text: Option<&str>) -> Result<Option<String>, DeviceError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > MAX_LOCATION || forbidden_control(text, Controls::None).is_some() {
        return Err(invalid(
            "/location",
            "invalid_format",
            format!("a location has at most {MAX_LOCATION} characters and no control characters"),
        ));
    }
    Ok(Some(text.to_owned()))
}

/// Tags: at most 32, each an identifier of at most 64 characters, lower-cased; duplicates
/// are dropped and the rest sorted.
pub fn tags(list: &[String]) -> Result<Vec<String>, DeviceError> {
    if list.len() > MAX_TAGS {
        return Err(invalid(
            "/tags",
            "too_many",
            format!("a device has at most {MAX_TAGS} tags"),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for tag in list {
        let tag = tag.to_ascii_lowercase();
        if !is_ident(&tag) {
            return Err(invalid(
                "/tags",
                "invalid_format",
                format!(
                    "a tag is 1 to {MAX_TAG} ASCII letters, digits and `._:-`, starting with a letter or digit"
                ),
            ));
        }
        out.push(tag);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Metadata: a JSON object of at most 8 KiB, nested at most 8 deep. Answers its text.
pub fn metadata(value: Option<&serde_json::Value>) -> Result<String, DeviceError> {
    let Some(value) = value else {
        return Ok("{}".to_owned());
    };
    if !value.is_object() {
        return Err(invalid(
            "/metadata",
            "invalid_type",
            "metadata is a JSON object",
        ));
    }
    if depth(value) > MAX_METADATA_DEPTH {
        return Err(invalid(
            "/metadata",
            "too_deep",
            format!("metadata is nested at most {MAX_METADATA_DEPTH} deep"),
        ));
    }
    let text = value.to_string();
    if text.len() > MAX_METADATA_BYTES {
        return Err(invalid(
            "/metadata",
            "too_large",
            format!("metadata has at most {MAX_METADATA_BYTES} bytes of JSON"),
        ));
    }
    Ok(text)
}

/// An inactivity timeout in seconds: 10 s to 30 days.
pub fn timeout(secs: Option<i64>) -> Result<Option<i64>, DeviceError> {
    match secs {
        Some(s) if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&s) => Err(invalid(
            "/inactivity_timeout",
            "out_of_range",
            format!("an inactivity timeout is {MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS} seconds"),
        )),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_parsed_with_their_limits() {
        assert_eq!(name("  boiler  ").unwrap(), "boiler");
        assert!(name("").is_err());
        assert!(name(&"x".repeat(101)).is_err());
        assert!(name("a\u{202e}b").is_err());
        assert_eq!(ident("/model", "esp32-s3").unwrap(), "esp32-s3");
        for bad in ["", "-x", "a b", "é", &"m".repeat(65)] {
            assert!(ident("/model", bad).is_err(), "{bad}");
        }
        assert_eq!(location(Some("  ")).unwrap(), None);
        assert!(location(Some("a\nb")).is_err());
        assert_eq!(
            tags(&["Lab".into(), "heat".into(), "lab".into()]).unwrap(),
            ["heat", "lab"]
        );
        assert!(tags(&vec!["t".to_owned(); 33]).is_err());
        assert!(tags(&["has space".into()]).is_err());
        assert_eq!(metadata(None).unwrap(), "{}");
        assert!(metadata(Some(&serde_json::json!([1]))).is_err());
        let deep = (0..9).fold(serde_json::json!(1), |v, _| serde_json::json!({ "a": v }));
        assert!(metadata(Some(&deep)).is_err());
        let big = serde_json::json!({ "a": "x".repeat(9000) });
        assert!(metadata(Some(&big)).is_err());
        assert_eq!(timeout(Some(60)).unwrap(), Some(60));
        assert!(timeout(Some(9)).is_err());
        assert!(timeout(Some(MAX_TIMEOUT_SECS + 1)).is_err());
    }
}
