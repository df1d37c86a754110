from ordermesh.cli import run

run()
