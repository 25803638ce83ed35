//! The protobuf codec of every generated service and client: prost's, except that a request
//! that fails to decode is the caller's mistake, answered `INVALID_ARGUMENT` naming the field
//! (e.g. a `string` that is not UTF-8), where tonic's default says `INTERNAL`.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// prost encoding; decode failures become `INVALID_ARGUMENT` with a `BadRequest` field violation.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> ProstCodec<T, U> {
    pub fn new() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(ProstDecoder::new(BufferSettings::default()))
    }
}

/// prost's decoder with decode errors mapped by [`decode_error_status`].
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(decode_error_status)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

const PREFIX: &str = "failed to decode Protobuf message: ";

/// Turns prost's `failed to decode Protobuf message: Inner.field: Outer.field: description`
/// into `INVALID_ARGUMENT` for the field path `field.field` (outermost first).
pub fn decode_error_status(status: Status) -> Status {
    if status.code() != Code::Internal {
        return status;
    }
    let Some(rest) = status.message().strip_prefix(PREFIX) else {
        return status;
    };
    let mut fields = Vec::new();
    let mut description = rest;
    while let Some((head, tail)) = description.split_once(": ") {
        match head.split_once('.') {
            Some((message, field))
                if !message.is_empty()
                    && !field.is_empty()
                    && !head.contains(' ')
                    && message.chars().next().is_some_and(char::is_uppercase) =>
            {
                fields.push(field.to_owned());
                description = tail;
            }
            _ => break,
        }
    }
    fields.reverse();
    let field = fields.join(".");
    let message = if description.contains("not UTF-8") {
        format!("`{field}` must be valid UTF-8, got bytes that are not ({description})")
    } else if field.is_empty() {
        format!("the request is not a valid protobuf message: {description}")
    } else {
        format!("`{field}` could not be decoded: {description}")
    };
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_errors_name_the_nested_field() {
        let s = decode_error_status(Status::internal(
            "failed to decode Protobuf message: GenerationParameters.stop: GenerateRequest.parameters: invalid string value: data is not UTF-8 encoded",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("`parameters.stop` must be valid UTF-8"),
            "{}",
            s.message()
        );
        let br = s.get_details_bad_request().expect("bad request details");
        assert_eq!(br.field_violations[0].field, "parameters.stop");
    }

    #[test]
    fn other_statuses_pass_through() {
        let s = decode_error_status(Status::internal("model failed"));
        assert_eq!(s.code(), Code::Internal);
        let s = decode_error_status(Status::internal(
            "failed to decode Protobuf message: buffer underflow",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("buffer underflow"));
    }
}
