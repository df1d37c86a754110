from ordermesh.cli import app

app()
