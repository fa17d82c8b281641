//! Security at the edges of the service: mTLS on the gRPC port with certificate reload
//! (`tls`), the caller allow-lists (`authorization`) and encryption of sensitive
//! property values before they reach PostgreSQL (`pii`).

pub(crate) mod authorization;
pub mod pii;
pub(crate) mod tls;
