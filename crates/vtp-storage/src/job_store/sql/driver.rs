//! What the SQL store asks of a database, with sqlx's bounds spelled once.
//!
//! The store's code is generic over `DB:` [`Runs`]: it builds each
//! statement with a [`QueryBuilder`], binding [`Value`]s beside the column
//! names they belong to, runs it on a connection and decodes rows by column
//! name. Whether a database can do all that (encode a UUID, decode a
//! `JobRow`, execute on a `&mut Connection`) is a pile of sqlx trait bounds;
//! they sit on the one blanket impl of [`Runs`] below, which SQLite and
//! Postgres both satisfy, so no function of the store repeats them.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, QueryBuilder, Type};
use uuid::Uuid;

/// One value bound to a statement, in the types both databases share.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// A UUID (`uuid` on Postgres, a blob on SQLite).
    Uuid(Uuid),
    /// Text, or NULL.
    Text(Option<&'a str>),
    /// A 32-bit integer.
    Int(i32),
    /// A 64-bit integer, or NULL.
    BigInt(Option<i64>),
    /// A double.
    Float(f64),
    /// A boolean, or NULL.
    Bool(Option<bool>),
    /// An instant, or NULL.
    Time(Option<DateTime<Utc>>),
    /// A JSON document (`jsonb` on Postgres, text on SQLite), or NULL:
    /// serialized once, as the column stores it.
    Json(Option<Box<serde_json::value::RawValue>>),
}

impl Value<'_> {
    /// `value` as a JSON document.
    ///
    /// # Errors
    /// When `value` does not serialize (a map with non-string keys).
    pub fn json(value: &impl serde::Serialize) -> vtp_core::Result<Value<'static>> {
        serde_json::value::to_raw_value(value)
            .map(|json| Value::Json(Some(json)))
            .map_err(|e| vtp_core::Error::internal(format!("a JSON column: {e}")))
    }
}

impl From<Uuid> for Value<'_> {
    fn from(value: Uuid) -> Self {
        Value::Uuid(value)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(value: &'a str) -> Self {
        Value::Text(Some(value))
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Value::Text(value)
    }
}

impl From<i32> for Value<'_> {
    fn from(value: i32) -> Self {
        Value::Int(value)
    }
}

impl From<i64> for Value<'_> {
    fn from(value: i64) -> Self {
        Value::BigInt(Some(value))
    }
}

impl From<f64> for Value<'_> {
    fn from(value: f64) -> Self {
        Value::Float(value)
    }
}

impl From<bool> for Value<'_> {
    fn from(value: bool) -> Self {
        Value::Bool(Some(value))
    }
}

impl From<DateTime<Utc>> for Value<'_> {
    fn from(value: DateTime<Utc>) -> Self {
        Value::Time(Some(value))
    }
}

impl From<Option<DateTime<Utc>>> for Value<'_> {
    fn from(value: Option<DateTime<Utc>>) -> Self {
        Value::Time(value)
    }
}

/// Decodes a `T` from a row of this database, by column name.
pub trait Decodes<T>: Database {
    /// `row` as a `T`.
    ///
    /// # Errors
    /// A column that is missing or does not decode.
    fn decode(row: &Self::Row) -> sqlx::Result<T>;
}

impl<DB: Database, T> Decodes<T> for DB
where
    T: for<'r> FromRow<'r, DB::Row>,
{
    fn decode(row: &DB::Row) -> sqlx::Result<T> {
        T::from_row(row)
    }
}

/// A database the SQL store runs on: it binds every [`Value`], runs a built
/// statement on a connection, and decodes the store's rows.
pub trait Runs:
    Database
    + Decodes<super::JobRow>
    + Decodes<super::MetricRow>
    + Decodes<super::credentials::TokenRow>
    + Decodes<super::EventRow>
    + Decodes<super::PlaceRow>
    + Decodes<super::CountRow>
    + Decodes<super::credentials::SecretRow>
{
    /// Binds `value` as the query's next parameter (its placeholder pushed).
    fn bind(query: &mut QueryBuilder<Self>, value: Value<'_>);

    /// Runs `query`, discarding rows.
    fn execute<'e>(
        conn: &'e mut Self::Connection,
        query: &'e mut QueryBuilder<Self>,
    ) -> BoxFuture<'e, sqlx::Result<Self::QueryResult>>;

    /// Runs `query`: every row.
    fn fetch_all<'e>(
        conn: &'e mut Self::Connection,
        query: &'e mut QueryBuilder<Self>,
    ) -> BoxFuture<'e, sqlx::Result<Vec<Self::Row>>>;

    /// Runs `query`: its first row, if any.
    fn fetch_optional<'e>(
        conn: &'e mut Self::Connection,
        query: &'e mut QueryBuilder<Self>,
    ) -> BoxFuture<'e, sqlx::Result<Option<Self::Row>>>;
}

impl<DB> Runs for DB
where
    DB: Database
        + Decodes<super::JobRow>
        + Decodes<super::MetricRow>
        + Decodes<super::credentials::TokenRow>
        + Decodes<super::EventRow>
        + Decodes<super::PlaceRow>
        + Decodes<super::CountRow>
        + Decodes<super::credentials::SecretRow>,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    Uuid: for<'t> Encode<'t, DB> + Type<DB>,
    i32: for<'t> Encode<'t, DB> + Type<DB>,
    f64: for<'t> Encode<'t, DB> + Type<DB>,
    for<'s> Option<&'s str>: Encode<'s, DB> + Type<DB>,
    Option<i64>: for<'t> Encode<'t, DB> + Type<DB>,
    Option<bool>: for<'t> Encode<'t, DB> + Type<DB>,
    Option<DateTime<Utc>>: for<'t> Encode<'t, DB> + Type<DB>,
    Option<Box<serde_json::value::RawValue>>: for<'t> Encode<'t, DB> + Type<DB>,
{
    fn bind(query: &mut QueryBuilder<DB>, value: Value<'_>) {
        match value {
            Value::Uuid(v) => query.push_bind(v),
            Value::Text(v) => query.push_bind(v),
            Value::Int(v) => query.push_bind(v),
            Value::BigInt(v) => query.push_bind(v),
            Value::Float(v) => query.push_bind(v),
            Value::Bool(v) => query.push_bind(v),
            Value::Time(v) => query.push_bind(v),
            Value::Json(v) => query.push_bind(v),
        };
    }

    fn execute<'e>(
        conn: &'e mut DB::Connection,
        query: &'e mut QueryBuilder<DB>,
    ) -> BoxFuture<'e, sqlx::Result<DB::QueryResult>> {
        conn.execute(query.build())
    }

    fn fetch_all<'e>(
        conn: &'e mut DB::Connection,
        query: &'e mut QueryBuilder<DB>,
    ) -> BoxFuture<'e, sqlx::Result<Vec<DB::Row>>> {
        conn.fetch_all(query.build())
    }

    fn fetch_optional<'e>(
        conn: &'e mut DB::Connection,
        query: &'e mut QueryBuilder<DB>,
    ) -> BoxFuture<'e, sqlx::Result<Option<DB::Row>>> {
        conn.fetch_optional(query.build())
    }
}

/// Binding [`Value`]s onto a statement as it is built.
pub trait BindExt {
    /// Binds `value` as the next parameter.
    fn bind_value<'v>(&mut self, value: impl Into<Value<'v>>) -> &mut Self;

    /// Binds `values`, separated by commas.
    fn bind_list<'v>(&mut self, values: impl IntoIterator<Item = Value<'v>>) -> &mut Self;
}

impl<DB: Runs> BindExt for QueryBuilder<DB> {
    fn bind_value<'v>(&mut self, value: impl Into<Value<'v>>) -> &mut Self {
        DB::bind(self, value.into());
        self
    }

    fn bind_list<'v>(&mut self, values: impl IntoIterator<Item = Value<'v>>) -> &mut Self {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            DB::bind(self, value);
        }
        self
    }
}
