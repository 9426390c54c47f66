def main(argv):
    print("cli", argv); return 0
