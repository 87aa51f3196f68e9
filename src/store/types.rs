//! How the domain's identifiers travel through SQL, on both backends:
//! positions and versions as the `BIGINT` / `INTEGER` they are stored as
//! (refused on the way in if too large for an `i64`, on the way out if
//! negative), stream ids and subjects as text, event ids as text on SQLite
//! and as `uuid` on PostgreSQL (whose reads hand them out as text:
//! `event_id::text`).
//!
//! Stream ids and subjects read back are not parsed again
//! ([`StreamId::from_store`], [`Subject::from_store`]): the store holds only
//! names that passed their parser, and system streams (`$…`) that no parser
//! for writing accepts.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgHasArrayType, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{SqliteArgumentsBuffer, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Database, Decode, Encode, Postgres, Sqlite, Type, ValueRef};
use uuid::Uuid;

use crate::domain::{EventId, Position, StreamId, Subject, Version};

/// `Type`, `Encode` and `Decode` of a `u64` counter, as an `i64`.
macro_rules! counter_as_i64 {
    ($name:ident, $what:literal) => {
        impl<DB: Database> Type<DB> for $name
        where
            i64: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <i64 as Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <i64 as Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $name
        where
            i64: Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as Database>::ArgumentBuffer,
            ) -> Result<IsNull, BoxDynError> {
                let n = i64::try_from(self.get())
                    .map_err(|_| format!("{} {} does not fit in a BIGINT", $what, self))?;
                <i64 as Encode<'q, DB>>::encode(n, buf)
            }

            fn size_hint(&self) -> usize {
                std::mem::size_of::<i64>()
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $name
        where
            i64: Decode<'r, DB>,
        {
            fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let n = <i64 as Decode<'r, DB>>::decode(value)?;
                let n =
                    u64::try_from(n).map_err(|_| format!("stored {} {n} is negative", $what))?;
                Ok(Self::new(n))
            }
        }

        impl PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <i64 as PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <i64 as PgHasArrayType>::array_compatible(ty)
            }
        }
    };
}

counter_as_i64!(Position, "position");
counter_as_i64!(Version, "version");

/// `Type`, `Encode` and `Decode` of a name kept as text, read back with
/// its type's trusted `from_store`.
macro_rules! name_as_text {
    ($name:ident) => {
        impl<DB: Database> Type<DB> for $name
        where
            String: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <String as Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <String as Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $name
        where
            String: Encode<'q, DB>,
        {
            fn encode(
                self,
                buf: &mut <DB as Database>::ArgumentBuffer,
            ) -> Result<IsNull, BoxDynError> {
                <String as Encode<'q, DB>>::encode(self.into_string(), buf)
            }

            fn encode_by_ref(
                &self,
                buf: &mut <DB as Database>::ArgumentBuffer,
            ) -> Result<IsNull, BoxDynError> {
                <String as Encode<'q, DB>>::encode(self.as_str().to_owned(), buf)
            }

            fn size_hint(&self) -> usize {
                self.as_str().len()
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $name
        where
            String: Decode<'r, DB>,
        {
            fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok(Self::from_store(<String as Decode<'r, DB>>::decode(value)?))
            }
        }

        impl PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <String as PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <String as PgHasArrayType>::array_compatible(ty)
            }
        }
    };
}

name_as_text!(StreamId);
name_as_text!(Subject);

fn parse_event_id(text: &str) -> Result<EventId, BoxDynError> {
    Uuid::parse_str(text)
        .map(EventId::new)
        .map_err(|_| format!("stored event id {text:?} is not a uuid").into())
}

/// SQLite: the hyphenated lower-case text of the uuid.
impl Type<Sqlite> for EventId {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for EventId {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        <String as Encode<'_, Sqlite>>::encode(self.to_string(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for EventId {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        parse_event_id(<&str as Decode<'r, Sqlite>>::decode(value)?)
    }
}

/// PostgreSQL: a `uuid` parameter; read back as the text reads make of it
/// (`event_id::text`), or as a `uuid`.
impl Type<Postgres> for EventId {
    fn type_info() -> PgTypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Uuid as Type<Postgres>>::compatible(ty) || <String as Type<Postgres>>::compatible(ty)
    }
}

impl PgHasArrayType for EventId {
    fn array_type_info() -> PgTypeInfo {
        <Uuid as PgHasArrayType>::array_type_info()
    }
}

impl Encode<'_, Postgres> for EventId {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <Uuid as Encode<'_, Postgres>>::encode_by_ref(self.as_uuid(), buf)
    }
}

impl<'r> Decode<'r, Postgres> for EventId {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        if <Uuid as Type<Postgres>>::compatible(&value.type_info()) {
            return Ok(EventId::new(<Uuid as Decode<'r, Postgres>>::decode(value)?));
        }
        parse_event_id(<&str as Decode<'r, Postgres>>::decode(value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[tokio::test]
    async fn identifiers_round_trip_and_negative_counts_are_refused() {
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let id = EventId::new(Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef));
        let stream = StreamId::subjects_ledger();
        let subject = Subject::parse("s-1").unwrap();
        let row: (EventId, String, StreamId, Subject, Position, Version) =
            sqlx::query_as("select $1, $1, $2, $3, $4, $5")
                .bind(id)
                .bind(&stream)
                .bind(&subject)
                .bind(Position::new(7))
                .bind(Version::new(u64::from(u32::MAX) + 1))
                .fetch_one(&mut db)
                .await
                .unwrap();
        assert_eq!(row.0, id);
        assert_eq!(
            row.1, "01234567-89ab-cdef-0123-456789abcdef",
            "kept as text"
        );
        assert_eq!((row.2, row.3), (stream, subject));
        assert_eq!((row.4, row.5), (Position::new(7), Version::new(1 << 32)));
        let negative = sqlx::query_scalar::<_, Position>("select -1")
            .fetch_one(&mut db)
            .await;
        assert!(
            matches!(negative, Err(sqlx::Error::ColumnDecode { .. })),
            "{negative:?}"
        );
        let too_large = sqlx::query_scalar::<_, i64>("select $1")
            .bind(Version::new(u64::MAX))
            .fetch_one(&mut db)
            .await;
        assert!(too_large.is_err(), "{too_large:?}");
        let not_a_uuid = sqlx::query_scalar::<_, EventId>("select 'x'")
            .fetch_one(&mut db)
            .await;
        assert!(not_a_uuid.is_err(), "{not_a_uuid:?}");
    }
}
