"""genapi: a generative-AI model behind one clean HTTP endpoint. The app itself is built in app.py."""
