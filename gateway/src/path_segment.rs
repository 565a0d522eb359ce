//! What may be a segment of an upstream path: a pool or deployment name, or a segment of a
//! client's operation path. One rule, used by admission and by the configuration's check of
//! deployment names.
//!
//! A segment may hold RFC 3986 unreserved characters only (`A-Z a-z 0-9 - . _ ~`) and may
//! not start or end with a dot. That one rule refuses every traversal form: `.`/`..`, any
//! percent-encoding (`%2e`, `%2f`, `%5c`, double encoding, overlong UTF-8), `;` parameters,
//! backslashes, empty segments (`//`, a trailing `/`) and trailing dots.

use std::fmt;

/// At most this many segments after the deployment (Azure's deepest data-plane path has 4).
pub const MAX_SEGMENTS: usize = 8;
/// At most this many bytes per segment (ids are far shorter).
pub const MAX_SEGMENT_BYTES: usize = 128;

/// Why a path was refused; the message names the segment by position, never echoes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRejection {
    /// The deployment (pool) name in `/openai/deployments/{name}/` is not a plain name.
    DeploymentName,
    Empty,
    TooManySegments,
    EmptySegment {
        position: usize,
    },
    TooLong {
        position: usize,
    },
    DotSegment {
        position: usize,
    },
    Character {
        position: usize,
    },
}

impl fmt::Display for PathRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeploymentName => write!(
                f,
                "the deployment name must use only letters, digits, '-', '.', '_', '~' and not start or end with '.'"
            ),
            Self::Empty => write!(f, "the path names no operation"),
            Self::TooManySegments => {
                write!(f, "the operation has more than {MAX_SEGMENTS} segments")
            }
            Self::EmptySegment { position } => {
                write!(
                    f,
                    "operation segment {position} is empty ('//' or a trailing '/')"
                )
            }
            Self::TooLong { position } => {
                write!(
                    f,
                    "operation segment {position} is longer than {MAX_SEGMENT_BYTES} bytes"
                )
            }
            Self::DotSegment { position } => {
                write!(f, "operation segment {position} starts or ends with '.'")
            }
            Self::Character { position } => write!(
                f,
                "operation segment {position} holds a character other than letters, digits, '-', '.', '_', '~' (percent-encoding is not accepted)"
            ),
        }
    }
}

/// One segment: a name made of unreserved characters that is not, and cannot be read as,
/// a dot segment by any server along the way.
pub fn check_segment(segment: &str, position: usize) -> Result<(), PathRejection> {
    if segment.is_empty() {
        return Err(PathRejection::EmptySegment { position });
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(PathRejection::TooLong { position });
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        return Err(PathRejection::Character { position });
    }
    // Covers `.`, `..`, and names with trailing dots, which some servers strip.
    if segment.starts_with('.') || segment.ends_with('.') {
        return Err(PathRejection::DotSegment { position });
    }
    Ok(())
}
