//! Security at the edges of the service: mTLS on the gRPC port with certificate reload
//! (`tls`), who is calling (`caller`), the caller allow-lists (`authorization`) and
//! encryption of sensitive property values before they reach PostgreSQL (`pii`), and the
//! keyed hash that names a user where its id must not be stored (`subject`).

pub(crate) mod authorization;
pub(crate) mod caller;
pub mod pii;
pub mod subject;
pub(crate) mod tls;
