//! The decoder of a watch stream: the gateway answers `POST /v3/watch` with a chunked body of
//! JSON objects, one per line, and chunk boundaries fall anywhere (inside an object, between
//! the bytes of a UTF-8 character). [`JsonStream`] buffers bytes and hands out complete
//! objects; it does not rely on the newlines, only on JSON syntax.

use serde::de::DeserializeOwned;

/// The most a single message may take in the buffer (a watch batch of many large values);
/// beyond it the stream is refused rather than grown without bound.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Why a stream could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The bytes are not JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// One message grew beyond [`MAX_MESSAGE_BYTES`].
    #[error("a message exceeds {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
}

/// Splits a byte stream into JSON values.
#[derive(Debug, Default)]
pub(crate) struct JsonStream {
    buffer: Vec<u8>,
}

impl JsonStream {
    /// Appends a chunk of the body.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete value, or `None` until more bytes arrive.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] when the buffered bytes cannot be a value of type `T`.
    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DecodeError> {
        let start = self
            .buffer
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buffer.len());
        self.buffer.drain(..start);
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<T>();
        match values.next() {
            Some(Ok(value)) => {
                let used = values.byte_offset();
                self.buffer.drain(..used);
                Ok(Some(value))
            }
            Some(Err(error)) if error.is_eof() => {
                if self.buffer.len() > MAX_MESSAGE_BYTES {
                    return Err(DecodeError::TooLarge);
                }
                Ok(None)
            }
            Some(Err(error)) => Err(error.into()),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn decode_all(stream: &mut JsonStream) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(value) = stream.next::<Value>().unwrap() {
            out.push(value);
        }
        out
    }

    #[test]
    fn splits_a_stream_at_every_chunk_boundary() {
        let body = "{\"result\":{\"created\":true}}\n{\"result\":{\"events\":[{\"kv\":{\"key\":\"w6k=\",\"value\":\"x\"}}],\"note\":\"caf\u{e9} }{\"}}\n\n{\"error\":{\"message\":\"bye\"}}\n";
        let expected = vec![
            json!({"result": {"created": true}}),
            json!({"result": {"events": [{"kv": {"key": "w6k=", "value": "x"}}], "note": "caf\u{e9} }{"}}),
            json!({"error": {"message": "bye"}}),
        ];
        let bytes = body.as_bytes();
        // Every split point, including inside the two-byte 'é' and inside strings with braces.
        for split in 0..=bytes.len() {
            let mut stream = JsonStream::default();
            stream.push(&bytes[..split]);
            let mut got = decode_all(&mut stream);
            stream.push(&bytes[split..]);
            got.extend(decode_all(&mut stream));
            assert_eq!(got, expected, "split at {split}");
        }
        // Byte by byte.
        let mut stream = JsonStream::default();
        let mut got = Vec::new();
        for byte in bytes {
            stream.push(std::slice::from_ref(byte));
            got.extend(decode_all(&mut stream));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn objects_need_no_newline_between_them() {
        let mut stream = JsonStream::default();
        stream.push(br#"{"a":1}{"b":2}  {"c":"#);
        assert_eq!(
            decode_all(&mut stream),
            vec![json!({"a": 1}), json!({"b": 2})]
        );
        stream.push(b"3}");
        assert_eq!(decode_all(&mut stream), vec![json!({"c": 3})]);
    }

    #[test]
    fn garbage_is_an_error_not_a_stall() {
        let mut stream = JsonStream::default();
        stream.push(b"<html>502 Bad Gateway</html>");
        assert!(matches!(
            stream.next::<Value>(),
            Err(DecodeError::Malformed(_))
        ));
        let mut stream = JsonStream::default();
        stream.push(br#"{"result": 5}"#);
        #[derive(Debug, serde::Deserialize)]
        struct Shape {
            #[allow(dead_code)]
            result: String,
        }
        assert!(stream.next::<Shape>().is_err());
    }
}
