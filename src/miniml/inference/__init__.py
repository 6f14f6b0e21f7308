"""The data plane: serves every active deployment, reconciled with the api."""
