typedef int kvf__placeholder_t;
int main(void){return 0;}
