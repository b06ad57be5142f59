// The API reference: Swagger UI (vendored) over /openapi.json. "Try it out" sends the
// dashboard's token (sessionStorage) on actions unless one was set with "Authorize".
/* global SwaggerUIBundle */
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger",
  deepLinking: true,
  // No validator badge: it would ask an outside server about this description.
  validatorUrl: null,
  requestInterceptor: (req) => {
    const token = sessionStorage.getItem("tally.token");
    const method = (req.method || "GET").toUpperCase();
    if (token && method !== "GET" && !req.headers.Authorization) {
      req.headers.Authorization = `Bearer ${token}`;
    }
    return req;
  },
});
