//! ESP32 application images, checked from their own bytes as they stream in: the header
//! (`0xE9`, the segment count, the chip in the extended header), every segment, the checksum
//! byte, the appended SHA-256 when the header says there is one, and the `esp_app_desc_t` at the
//! start of the first segment (magic `0xABCD5432`, version, project, `secure_version`, IDF
//! version, the ELF's SHA-256). The layout is ESP-IDF's `esp_image_format.h` and
//! `esp_app_desc.h`.
//!
//! [`ImageChecker`] takes the image in chunks of any size and holds at most a few hundred
//! bytes, so an upload is checked while it is written to storage, never held whole.

use sha2::{Digest, Sha256};
use unhidra_core::hex;

/// The first byte of every image.
pub const IMAGE_MAGIC: u8 = 0xE9;
/// The first word of `esp_app_desc_t`.
pub const APP_DESC_MAGIC: u32 = 0xABCD_5432;
/// The most segments an image has (`ESP_IMAGE_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: u8 = 16;
/// The header with its extended part.
const HEADER_LEN: usize = 24;
const SEGMENT_HEADER_LEN: usize = 8;
/// `esp_app_desc_t`.
const APP_DESC_LEN: usize = 256;
/// The checksum's seed.
const CHECKSUM_SEED: u8 = 0xEF;
/// The largest segment ESP-IDF builds (the whole flash of the largest parts).
const MAX_SEGMENT_LEN: u32 = 32 * 1024 * 1024;

/// Why an image was refused; `code` is the API's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The first byte is not `0xE9`.
    #[error("not an ESP32 app image: the first byte is {0:#04x}, not 0xe9")]
    BadMagic(u8),
    /// No segments, or more than ESP-IDF allows.
    #[error("an image has 1 to 16 segments, not {0}")]
    SegmentCount(u8),
    /// A chip id this server does not know.
    #[error("unknown chip id {0:#06x} in the extended header")]
    UnknownChip(u16),
    /// A segment longer than any flash.
    #[error("segment {0} claims {1} bytes")]
    SegmentTooLong(u8, u32),
    /// The first segment does not begin with `esp_app_desc_t`.
    #[error("the first segment does not begin with esp_app_desc_t (magic 0xabcd5432)")]
    NoAppDesc,
    /// A text field of `esp_app_desc_t` is not NUL-terminated UTF-8.
    #[error("esp_app_desc_t's {0} is not text")]
    BadText(&'static str),
    /// The image ends before its segments, checksum or hash do.
    #[error("the image is truncated: it ends at byte {0}")]
    Truncated(u64),
    /// The checksum byte does not match the segments.
    #[error("the checksum is {found:#04x}, the segments give {computed:#04x}")]
    Checksum {
        /// In the image.
        found: u8,
        /// Of the segments.
        computed: u8,
    },
    /// The appended SHA-256 does not match the image.
    #[error("the appended SHA-256 does not match the image")]
    Hash,
    /// Bytes after the end of the image.
    #[error("{0} bytes follow the end of the image")]
    TrailingData(u64),
}

impl ImageError {
    /// The stable code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadMagic(_) => "not_an_esp_image",
            Self::SegmentCount(_) | Self::SegmentTooLong(..) => "malformed_image",
            Self::UnknownChip(_) => "unknown_chip",
            Self::NoAppDesc | Self::BadText(_) => "no_app_description",
            Self::Truncated(_) => "truncated_image",
            Self::Checksum { .. } | Self::Hash => "corrupt_image",
            Self::TrailingData(_) => "trailing_data",
        }
    }
}

/// The ESP32 chips, by the id in the extended header (`esp_chip_id_t`).
pub fn chip_name(id: u16) -> Option<&'static str> {
    Some(match id {
        0x0000 => "esp32",
        0x0002 => "esp32s2",
        0x0005 => "esp32c3",
        0x0009 => "esp32s3",
        0x000C => "esp32c2",
        0x000D => "esp32c6",
        0x0010 => "esp32h2",
        0x0012 => "esp32p4",
        0x0017 => "esp32c5",
        _ => return None,
    })
}

/// What an image says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspImage {
    /// The chip it is built for (`esp32s3`, …).
    pub chip: &'static str,
    /// `esp_app_desc_t.version`.
    pub version: String,
    /// `esp_app_desc_t.project_name`.
    pub project: String,
    /// `esp_app_desc_t.secure_version`, for anti-rollback.
    pub secure_version: u32,
    /// `esp_app_desc_t.idf_ver`.
    pub idf_version: String,
    /// `esp_app_desc_t.app_elf_sha256`, hex.
    pub elf_sha256: String,
    /// The whole file's SHA-256, hex: its content address.
    pub sha256: String,
    /// The whole file's length.
    pub size: u64,
}

#[derive(Debug)]
enum Stage {
    Header,
    SegmentHeader,
    Segment { left: u64 },
    Padding { left: u64 },
    Checksum,
    Hash,
    Done,
}

/// Checks an image fed in chunks; see the module's documentation.
#[derive(Debug)]
pub struct ImageChecker {
    stage: Stage,
    /// The bytes of the piece being read (a header, the app description, the hash).
    buf: Vec<u8>,
    position: u64,
    segments: u8,
    segment: u8,
    hash_appended: bool,
    chip: Option<&'static str>,
    checksum: u8,
    /// The first segment's first bytes, for `esp_app_desc_t`.
    desc: Vec<u8>,
    /// Everything, for the content address.
    whole: Sha256,
    /// Everything before the appended hash.
    body: Sha256,
    trailing: u64,
    error: Option<ImageError>,
}

impl Default for ImageChecker {
    fn default() -> Self {
        Self::new()
    }
}

/// A NUL-terminated text field.
fn text(field: &'static str, bytes: &[u8]) -> Result<String, ImageError> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).map_err(|_| ImageError::BadText(field))?;
    if text.chars().any(char::is_control) {
        return Err(ImageError::BadText(field));
    }
    Ok(text.to_owned())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl ImageChecker {
    /// A checker at the start of an image.
    pub fn new() -> Self {
        Self {
            stage: Stage::Header,
            buf: Vec::with_capacity(HEADER_LEN),
            position: 0,
            segments: 0,
            segment: 0,
            hash_appended: false,
            chip: None,
            checksum: CHECKSUM_SEED,
            desc: Vec::with_capacity(APP_DESC_LEN),
            whole: Sha256::new(),
            body: Sha256::new(),
            trailing: 0,
            error: None,
        }
    }

    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.position
    }

    /// Whether nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.position == 0
    }

    /// The first refusal, as soon as the bytes read show it (the rest can then be dropped).
    pub fn error(&self) -> Option<&ImageError> {
        self.error.as_ref()
    }

    /// Reads the next chunk. Answers the refusal once the bytes show one.
    pub fn update(&mut self, mut chunk: &[u8]) -> Result<(), ImageError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.whole.update(chunk);
        while !chunk.is_empty() {
            let taken = match self.step(chunk) {
                Ok(n) => n,
                Err(e) => {
                    self.error = Some(e.clone());
                    return Err(e);
                }
            };
            chunk = &chunk[taken..];
        }
        Ok(())
    }

    /// Takes what the current stage needs from `chunk`; answers how many bytes it took.
    fn step(&mut self, chunk: &[u8]) -> Result<usize, ImageError> {
        // Everything before the appended hash is hashed for it.
        let in_body = !matches!(self.stage, Stage::Hash | Stage::Done);
        let take = |buf: &mut Vec<u8>, want: usize| {
            let n = (want - buf.len()).min(chunk.len());
            buf.extend_from_slice(&chunk[..n]);
            n
        };
        let n = match self.stage {
            Stage::Header => {
                let n = take(&mut self.buf, HEADER_LEN);
                if self.buf.first().is_some_and(|&b| b != IMAGE_MAGIC) {
                    return Err(ImageError::BadMagic(self.buf[0]));
                }
                if self.buf.len() == HEADER_LEN {
                    self.header()?;
                }
                n
            }
            Stage::SegmentHeader => {
                let n = take(&mut self.buf, SEGMENT_HEADER_LEN);
                if self.buf.len() == SEGMENT_HEADER_LEN {
                    let len = u32_at(&self.buf, 4);
                    if len > MAX_SEGMENT_LEN {
                        return Err(ImageError::SegmentTooLong(self.segment, len));
                    }
                    if self.segment == 0 && (len as usize) < APP_DESC_LEN {
                        return Err(ImageError::NoAppDesc);
                    }
                    self.buf.clear();
                    self.stage = Stage::Segment {
                        left: u64::from(len),
                    };
                    self.after_segment_if_empty_at(self.position + n as u64);
                }
                n
            }
            Stage::Segment { left } => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                let data = &chunk[..n];
                self.checksum = data.iter().fold(self.checksum, |c, b| c ^ b);
                if self.segment == 0 && self.desc.len() < APP_DESC_LEN {
                    let want = (APP_DESC_LEN - self.desc.len()).min(n);
                    self.desc.extend_from_slice(&data[..want]);
                    if self.desc.len() == APP_DESC_LEN && u32_at(&self.desc, 0) != APP_DESC_MAGIC {
                        return Err(ImageError::NoAppDesc);
                    }
                }
                self.stage = Stage::Segment {
                    left: left - n as u64,
                };
                self.after_segment_if_empty_at(self.position + n as u64);
                n
            }
            Stage::Padding { left } => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                self.stage = if left == n as u64 {
                    Stage::Checksum
                } else {
                    Stage::Padding {
                        left: left - n as u64,
                    }
                };
                n
            }
            Stage::Checksum => {
                let found = chunk[0];
                if found != self.checksum {
                    return Err(ImageError::Checksum {
                        found,
                        computed: self.checksum,
                    });
                }
                self.stage = if self.hash_appended {
                    Stage::Hash
                } else {
                    Stage::Done
                };
                1
            }
            Stage::Hash => take(&mut self.buf, 32),
            Stage::Done => {
                self.trailing += chunk.len() as u64;
                chunk.len()
            }
        };
        if in_body {
            self.body.update(&chunk[..n]);
        }
        self.position += n as u64;
        if matches!(self.stage, Stage::Hash) && self.buf.len() == 32 {
            let computed = self.body.clone().finalize();
            if computed.as_slice() != self.buf.as_slice() {
                return Err(ImageError::Hash);
            }
            self.buf.clear();
            self.stage = Stage::Done;
        }
        Ok(n)
    }

    fn header(&mut self) -> Result<(), ImageError> {
        let segments = self.buf[1];
        if segments == 0 || segments > MAX_SEGMENTS {
            return Err(ImageError::SegmentCount(segments));
        }
        let chip_id = u16::from_le_bytes([self.buf[12], self.buf[13]]);
        self.chip = Some(chip_name(chip_id).ok_or(ImageError::UnknownChip(chip_id))?);
        self.hash_appended = self.buf[23] == 1;
        self.segments = segments;
        self.buf.clear();
        self.stage = Stage::SegmentHeader;
        Ok(())
    }

    /// Moves past a segment whose bytes are all read; `end` is the offset after them.
    fn after_segment_if_empty_at(&mut self, end: u64) {
        if let Stage::Segment { left: 0 } = self.stage {
            self.segment += 1;
            self.stage = if self.segment < self.segments {
                Stage::SegmentHeader
            } else {
                // Zeros up to the checksum byte, which ends a 16-byte block.
                let left = 15 - (end % 16);
                if left == 0 {
                    Stage::Checksum
                } else {
                    Stage::Padding { left }
                }
            };
        }
    }

    /// The image's facts, once every byte was read.
    pub fn finish(self) -> Result<EspImage, ImageError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if !matches!(self.stage, Stage::Done) {
            return Err(ImageError::Truncated(self.position));
        }
        if self.trailing > 0 {
            return Err(ImageError::TrailingData(self.trailing));
        }
        let d = &self.desc;
        Ok(EspImage {
            chip: self.chip.unwrap_or("esp32"),
            secure_version: u32_at(d, 4),
            version: text("version", &d[16..48])?,
            project: text("project_name", &d[48..80])?,
            idf_version: text("idf_ver", &d[112..144])?,
            elf_sha256: hex(&d[144..176]),
            sha256: hex(&self.whole.finalize()),
            size: self.position,
        })
    }
}

/// Checks a whole image in memory (tests, small images).
pub fn check(bytes: &[u8]) -> Result<EspImage, ImageError> {
    let mut checker = ImageChecker::new();
    checker.update(bytes)?;
    checker.finish()
}

/// Builds a well-formed image, for tests here and elsewhere: one app segment that begins with
/// `esp_app_desc_t`, a second segment, the checksum and, when `hash`, the appended SHA-256.
pub fn build_test_image(
    chip_id: u16,
    version: &str,
    project: &str,
    secure_version: u32,
    hash: bool,
) -> Vec<u8> {
    build_test_image_of(chip_id, version, project, secure_version, hash, 700)
}

/// [`build_test_image`] with `code` bytes of code after the app description, for images of a
/// realistic size.
pub fn build_test_image_of(
    chip_id: u16,
    version: &str,
    project: &str,
    secure_version: u32,
    hash: bool,
    code: u32,
) -> Vec<u8> {
    let mut desc = vec![0u8; APP_DESC_LEN];
    desc[0..4].copy_from_slice(&APP_DESC_MAGIC.to_le_bytes());
    desc[4..8].copy_from_slice(&secure_version.to_le_bytes());
    desc[16..16 + version.len()].copy_from_slice(version.as_bytes());
    desc[48..48 + project.len()].copy_from_slice(project.as_bytes());
    desc[80..88].copy_from_slice(b"12:00:00");
    desc[96..107].copy_from_slice(b"Dec  2 2026");
    desc[112..118].copy_from_slice(b"v5.3.1");
    desc[144..176].copy_from_slice(&[0xAB; 32]);
    let mut first = desc;
    first.extend((0..code).map(|i| (i * 7) as u8));
    let second: Vec<u8> = (0..333u32).map(|i| (i * 13 + 5) as u8).collect();
    let mut image = vec![IMAGE_MAGIC, 2, 2, 0x20];
    image.extend_from_slice(&0x4008_0000u32.to_le_bytes());
    image.extend_from_slice(&[0xEE, 0, 0, 0]);
    image.extend_from_slice(&chip_id.to_le_bytes());
    image.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0]);
    image.push(u8::from(hash));
    let mut checksum = CHECKSUM_SEED;
    for (addr, data) in [(0x3F40_0020u32, &first), (0x4037_0000u32, &second)] {
        image.extend_from_slice(&addr.to_le_bytes());
        image.extend_from_slice(&(data.len() as u32).to_le_bytes());
        image.extend_from_slice(data);
        checksum = data.iter().fold(checksum, |c, b| c ^ b);
    }
    while image.len() % 16 != 15 {
        image.push(0);
    }
    image.push(checksum);
    if hash {
        let digest = Sha256::digest(&image);
        image.extend_from_slice(&digest);
    }
    image
}
