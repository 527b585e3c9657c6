"""The control plane: `/api/v1` over Starlette, the deploy service, the route publisher."""
